"""Logging set-up shared by the apps and the command line."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``kidneyfl.*`` and package loggers to stderr once per process."""
    root = logging.getLogger("kidneyfl")
    if getattr(root, "_kidneyfl_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("kidneyfl", "client", "server", "common"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False
    root._kidneyfl_configured = True  # type: ignore[attr-defined]
