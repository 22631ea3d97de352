"""A demo site's synthetic data, written from its site YAML's ``phantom`` section."""

from __future__ import annotations

from collections.abc import Callable

from common.config import SiteConfig
from sim.phantoms.kits_writer import write_site
from sim.phantoms.profiles import DEFAULT_SCALE, load_profile
from sim.phantoms.slices import write_cls_site_from_config


def _segmentation_phantom(site: SiteConfig) -> None:
    if site.phantom is None:
        return
    write_site(
        site.data.root,
        load_profile(site.phantom.profile),
        site.phantom.cases,
        seed=site.phantom.seed,
        scale=site.phantom.scale or DEFAULT_SCALE,
        # only ever replaces cases it generated itself (phantom.json present)
        overwrite=True,
    )


def _classification_phantom(site: SiteConfig) -> None:
    write_cls_site_from_config(site)


# Writers of a demo site's synthetic data, by the site YAML's ``phantom.task``.
PHANTOM_WRITERS: dict[str, Callable[[SiteConfig], None]] = {
    "segmentation": _segmentation_phantom,
    "classification": _classification_phantom,
}


def write_site_phantom(site: SiteConfig) -> None:
    """Write the synthetic cases a site YAML's ``phantom`` section asks for.

    Idempotent: complete cases written earlier with the same settings are kept.
    Does nothing for a site without a ``phantom`` section.
    """
    if site.phantom is not None:
        PHANTOM_WRITERS[site.phantom.task](site)
