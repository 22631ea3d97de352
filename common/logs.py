"""Logging set-up shared by the apps and the command line.

Three things every kidneyfl process does the same way:

- ``kidneyfl.*`` and package loggers go to stderr once per process, and also to
  ``$KIDNEYFL_LOG_DIR/kidneyfl.log`` when that variable is set (``kidneyfl site
  start`` sets it to the site's ``state_dir/logs``, so the SuperNode's
  ClientApp processes write to the site's own log file);
- the handful of warnings our dependencies print on every message are filtered
  where they come from, by module, category and message (never a blanket
  ``ignore``): they say nothing the operator can act on;
- a site's answer to each request is one line (:func:`request_line`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

LOG_DIR_ENV = "KIDNEYFL_LOG_DIR"
LOG_FILE = "kidneyfl.log"
_FORMAT = "%(levelname)s %(name)s: %(message)s"
_FILE_FORMAT = "%(asctime)s pid %(process)d %(levelname)s %(name)s: %(message)s"
_PACKAGES = ("kidneyfl", "client", "server", "common")

# (category, module regex, message regex): notices from the libraries we pin,
# about their own defaults, printed by every ClientApp process on every round.
DEPENDENCY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # MONAI 1.6 announces changed defaults (Orientationd labels, get_mask_edges).
    (FutureWarning, r"monai\.utils\.deprecate_utils", r"monai\."),
    # Opacus: we run with secure_mode off by design (docs/privacy.md).
    (UserWarning, r"opacus\.privacy_engine", r"Secure RNG turned off"),
    # Opacus' RDP analysis when the best order is its largest: the bound it
    # returns is then conservative (epsilon over- never under-stated).
    (UserWarning, r"opacus\.accountants", r"Optimal order is the largest alpha"),
    # torch, when Opacus' hooks see an input without gradients (the first layer).
    (UserWarning, r"torch\.", r"Full backward hook is firing"),
    # Ray's tip about accelerator environment variables (we set no GPUs on CPU).
    (FutureWarning, r"ray\._private\.worker", r"Tip: In future versions of Ray"),
    # MONAI's DICOM reader without NVIDIA's nvImageCodec (pydicom decodes).
    (UserWarning, r"monai\.data\.image_reader", r"NvImgCodecPydicomReader"),
)


# Dependency loggers that only say an optional accelerator is absent: MONAI's
# DICOM reader looks for NVIDIA's nvImageCodec whenever pydicom is installed
# (it is, for `kidneyfl site import-dicom`), on every scan read.
QUIET_LOGGERS = ("monai.data.nvimgcodec_pydicom_plugin",)


def quiet_dependency_warnings() -> None:
    """Filter :data:`DEPENDENCY_WARNINGS` in this process (idempotent); the
    loggers of :data:`QUIET_LOGGERS` say only errors."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, module, message in DEPENDENCY_WARNINGS:
        warnings.filterwarnings(
            "ignore", message=message, category=category, module=module
        )


def setup_logging(level: int = logging.INFO, log_file: Path | None = None) -> None:
    """Send ``kidneyfl.*`` and package loggers to stderr once per process.

    Parameters
    ----------
    level : int
        Level of the package loggers.
    log_file : Path, optional
        Also append every record, with time and PID, to this file. Without it,
        ``$KIDNEYFL_LOG_DIR/kidneyfl.log`` is used when the variable is set.
    """
    quiet_dependency_warnings()
    root = logging.getLogger("kidneyfl")
    if log_file is None and os.environ.get(LOG_DIR_ENV):
        log_file = Path(os.environ[LOG_DIR_ENV]) / LOG_FILE
    if log_file is not None:
        add_log_file(log_file)
    if getattr(root, "_kidneyfl_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    for name in _PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False
    root._kidneyfl_configured = True  # type: ignore[attr-defined]


def add_log_file(path: Path) -> logging.Handler:
    """Append the package loggers' records to ``path`` (once per file).

    Returns the handler, so a caller can remove it (``remove_log_file``).
    """
    path = Path(path).resolve()
    for handler in logging.getLogger("kidneyfl").handlers:
        if getattr(handler, "baseFilename", None) == str(path):
            return handler
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")  # append: many processes
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    for name in _PACKAGES:
        logging.getLogger(name).addHandler(handler)
    return handler


def remove_log_file(handler: logging.Handler) -> None:
    """Undo :func:`add_log_file`."""
    for name in _PACKAGES:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def request_line(
    site: str, kind: str, rnd: int | None, outcome: str, detail: str = ""
) -> str:
    """A site's one line about one request: what arrived and what it did.

    >>> request_line("hospital-a", "train", 3, "trained", "12 steps, epsilon 3.10")
    'hospital-a: train request (round 3): trained; 12 steps, epsilon 3.10'
    """
    where = f" (round {rnd})" if rnd is not None else ""
    return f"{site}: {kind} request{where}: {outcome}" + (
        f"; {detail}" if detail else ""
    )


def log_request(
    site: str, kind: str, rnd: int | None, outcome: str, detail: str = ""
) -> None:
    """Log :func:`request_line` on ``kidneyfl.site`` (a refusal as a warning)."""
    level = logging.WARNING if outcome.startswith("refused") else logging.INFO
    logging.getLogger("kidneyfl.site").log(
        level, "%s", request_line(site, kind, rnd, outcome, detail)
    )
