"""Writing phantom sites to disk in KiTS layout: atomic, resumable, and never
touching a folder it did not write itself (see ``phantom.json``).

An MR profile's images get a BIDS sidecar beside them, ``imaging.json`` with
``{"Modality": "MR"}``, as dcm2niix writes one (``client/scan_check.py`` reads
it)."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from common.atomic import atomic_write_bytes
from sim.phantoms.ct import generate_case
from sim.phantoms.profiles import (
    DEFAULT_SCALE,
    IMAGE_NAME,
    LABELS,
    METADATA_NAME,
    PHANTOM_VERSION,
    SEGMENTATION_NAME,
    SIDECAR_NAME,
    SiteProfile,
    voxel_spacing,
)

logger = logging.getLogger(__name__)
# Progress goes where pretraining's does: shown by every kidneyfl command.
progress_log = logging.getLogger("kidneyfl.progress")
PROGRESS_EVERY_S = 10.0


class _Progress:
    """Plain progress lines while phantom cases are written: the start, every
    :data:`PROGRESS_EVERY_S` seconds (cases, rate, time left) and the end."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what = total, what
        self.start = self.last = time.monotonic()
        if total:
            progress_log.info("writing %d phantom cases for %s", total, what)

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if not self.total or (done < self.total and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        elapsed = now - self.start
        if done >= self.total:
            progress_log.info(
                "phantom cases for %s: %d written in %.0f s", self.what, done, elapsed
            )
            return
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        progress_log.info(
            "phantom cases for %s: %d/%d (%.1f cases/s, about %.0f s left)",
            self.what,
            done,
            self.total,
            rate,
            left,
        )


_GZIP_LEVEL = 1  # noisy float32 barely compresses; level 1 keeps writes fast
_CASE_DIR_RE = re.compile(r"case_\d{5}")
_GENERATOR = "kidneyfl.common.phantom"  # marks folders kidneyfl may overwrite


def case_seed(site_seed: int, index: int) -> int:
    """Return the seed that :func:`write_site` uses for case ``index`` of a site."""
    return int(np.random.SeedSequence([site_seed, index]).generate_state(1)[0])


def _atomic_write(path: Path, payload: bytes, compress: bool = False) -> None:
    atomic_write_bytes(path, payload, compress=compress, compresslevel=_GZIP_LEVEL)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    _atomic_write(path, img.to_bytes(), compress=True)


def _sidecar(profile: SiteProfile) -> bytes:
    """The BIDS JSON dcm2niix writes beside an image (the keys a check reads)."""
    side = {
        "Modality": profile.modality,
        "SeriesDescription": f"kidneyfl phantom {profile.name}",
        "ImageType": ["DERIVED", "SYNTHETIC"],
    }
    return (json.dumps(side, indent=2) + "\n").encode()


def _remove_cases(case_dirs: list[Path]) -> None:
    for case_dir in case_dirs:
        for f in [
            case_dir / IMAGE_NAME,
            case_dir / SEGMENTATION_NAME,
            case_dir / SIDECAR_NAME,
            *case_dir.glob(".*.tmp"),
        ]:
            f.unlink(missing_ok=True)
        try:
            case_dir.rmdir()
        except OSError:
            logger.warning(
                "left %s in place: it holds files not written here", case_dir
            )


def write_site(
    out_dir: Path,
    profile: SiteProfile,
    n_cases: int,
    seed: int = 0,
    scale: float = DEFAULT_SCALE,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``n_cases`` phantom cases for one site in KiTS layout.

    Creates ``out_dir/case_00000/{imaging,segmentation}.nii.gz`` and so on, plus
    ``out_dir/phantom.json`` recording the request. A rerun with the same arguments
    keeps complete cases and only generates missing ones.

    Parameters
    ----------
    out_dir : Path
        Site directory, created if needed.
    profile, scale
        As for :func:`generate_case`.
    n_cases : int
        Number of cases (at least 1).
    seed : int
        Site seed; case ``i`` is ``generate_case(profile, case_seed(seed, i))``.
    overwrite : bool
        Replace cases that were generated with different settings.

    Returns
    -------
    list of Path
        The case directories, in order.

    Raises
    ------
    FileExistsError
        ``out_dir`` holds cases made with other settings and ``overwrite`` is False,
        or case directories without our ``phantom.json`` (never deleted).
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1, got {n_cases}")
    out_dir, meta_path = Path(out_dir), Path(out_dir) / METADATA_NAME
    meta: dict[str, Any] = {
        "generator": _GENERATOR,
        "phantom_version": PHANTOM_VERSION,
        "profile": profile.model_dump(),
        "seed": int(seed),
        "scale": float(scale),
        "n_cases": n_cases,
        "spacing_mm": list(voxel_spacing(profile, scale)),
        "labels": {str(k): v for k, v in LABELS.items()},
        "case_seeds": [case_seed(seed, i) for i in range(n_cases)],
    }
    case_dirs = [out_dir / f"case_{i:05d}" for i in range(n_cases)]
    files = (IMAGE_NAME, SEGMENTATION_NAME)
    if profile.modality != "CT":
        files += (SIDECAR_NAME,)
    try:
        existing = json.loads(meta_path.read_text())
    except FileNotFoundError:
        existing = None
    except (OSError, ValueError):
        existing = {}  # unreadable: cannot be ours, since we write it atomically
    present = sorted(
        p
        for p in out_dir.glob("case_*")
        if p.is_dir() and _CASE_DIR_RE.fullmatch(p.name)
    )

    todo = list(range(n_cases))
    if existing == meta:
        todo = [i for i in todo if not all((case_dirs[i] / n).is_file() for n in files)]
        if not todo:
            logger.info("%s: %d cases already up to date", out_dir, n_cases)
            return case_dirs
    elif existing is not None or present:
        ours = isinstance(existing, dict) and existing.get("generator") == _GENERATOR
        if present and not ours:
            # Never delete case dirs we did not write (e.g. real KiTS data).
            raise FileExistsError(
                f"{out_dir} holds case directories that were not written by the "
                "phantom generator; choose another directory"
            )
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} already holds phantom cases generated with different "
                f"settings (see {METADATA_NAME}); pass overwrite to replace them or "
                "choose another directory"
            )
        logger.info(
            "%s: removing %d cases made with other settings", out_dir, len(present)
        )
        _remove_cases(present)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Metadata goes first: with atomic case files, an interrupted run leaves only
    # complete cases that match it, which a rerun then keeps.
    _atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    progress = _Progress(len(todo), f"{out_dir.name} ({profile.name})")
    for done, i in enumerate(todo):
        progress(done)
        case = generate_case(profile, meta["case_seeds"][i], scale)
        case_dirs[i].mkdir(exist_ok=True)
        _save_nifti(case_dirs[i] / IMAGE_NAME, case.image, case.affine)
        _save_nifti(case_dirs[i] / SEGMENTATION_NAME, case.label, case.affine)
        if profile.modality != "CT":  # after the image: a rerun rewrites both
            _atomic_write(case_dirs[i] / SIDECAR_NAME, _sidecar(profile))
    progress(len(todo))
    logger.info(
        "%s: wrote %d of %d cases (profile %s, spacing %s mm)",
        out_dir,
        len(todo),
        n_cases,
        profile.name,
        meta["spacing_mm"],
    )
    return case_dirs
