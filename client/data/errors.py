"""The one error a site's data raise: what is wrong, where, and the fix."""

from __future__ import annotations


class SiteDataError(RuntimeError):
    """The site's data cannot be used for training; the message says why.

    Messages are site-local (they may name files and case ids); the ClientApp
    turns them into a fixed refusal sentence before anything leaves the site.
    """
