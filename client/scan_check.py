"""Does a scan look like what the model was trained on? (``kidneyfl predict``)

A model trained on CT in Hounsfield units segments whatever it is given: an MRI,
a CT stored without its rescale slope and intercept, or a crop of one organ
comes back as a confident "kidney" of hundreds of millilitres. Before
prediction each scan is checked against the checkpoint, whose plan says the
modality it was trained on (``plan.modality``, issue 29):

- **intensities are CT in HU** (a CT model): air (about -1000 HU) surrounds
  every abdominal CT, so some voxels must lie at or below :data:`AIR_HU`, and
  the scan must hold more than air; MRI and raw scanner values start at 0;
- **intensities are MR magnitudes** (an MR model): no air at -1000 HU, and no
  more than a trace of negative values (:func:`mr_intensity_problems`); a
  "mixed" model takes either;
- **modality**, where the file says it: a BIDS/dcm2niix JSON beside the NIfTI
  (``"Modality": "MR"``) or the NIfTI description (dcm2niix writes ``TE=`` for
  MR);
- **spacing and field of view** within what the run saw: the spacing and
  extent ranges of the sites' fingerprints (sidecar ``seen-scans``, written
  when the run had a fingerprint round), else generous bounds around the plan's
  spacing.

Each problem is a sentence saying what is wrong; ``predict`` refuses unless
forced.

Beyond these refusals, a continuous "unlike the training data" score
(``common/ood.py``) needs the predicted volumes, so ``predict`` computes it
after each case; :func:`check_scan` keeps the image half of its features
(:class:`ScanCheck`), so that the scan is not read a second time for them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from common.config import Plan
from common.ood import image_features
from common.scans import SEEN_SCANS_KEY

__all__ = [
    "SEEN_SCANS_KEY",
    "ScanCheck",
    "ScanMismatch",
    "check_scan",
    "intensity_kind",
    "looks_like_ct",
    "modality_problems",
    "mr_intensity_problems",
    "ras_view",
    "scan_problems",
]

AIR_HU = -500.0  # below any soft tissue or fat; air and lung only
MIN_AIR_FRACTION = 0.005  # of voxels; an abdominal CT field of view has far more
COARSER_THAN_PLAN = 4.0  # without seen ranges: spacing up to 4x the plan's
COARSER_THAN_SEEN = 2.0
MIN_EXTENT_MM = 40.0  # thinner than this on any axis: a slab, not a volume
MIN_INPLANE_MM = 100.0  # an abdomen is 250-450 mm across
SMALLER_THAN_SEEN = 0.5
# An MR magnitude image is non-negative; interpolation ringing (resampling)
# leaves a few slightly negative voxels: at most MR_NEGATIVE_FRACTION of them
# may lie below 0 by more than MR_NEGATIVE_SHARE of the maximum.
MR_NEGATIVE_SHARE = 0.05
MR_NEGATIVE_FRACTION = 0.01
NO_BODY_AIR_FRACTION = 0.99  # a CT this full of air holds no body
_MR_DESCRIP = re.compile(r"(^|[;\s])TE=|\bMRI?\b|\bT[12]w?\b", re.IGNORECASE)


class ScanMismatch(ValueError):
    """A scan is not like the model's training data (the message says how)."""


@dataclass(frozen=True, eq=False)  # eq=False: == on an array field would raise
class ScanCheck:
    """What checking one scan found.

    Attributes
    ----------
    problems : list of str
        Every way the scan differs from the training data (empty: none).
    image_features : numpy.ndarray or None
        ``common.ood.image_features`` of the scan (RAS axes), for its
        out-of-distribution score once the volumes are predicted; None when
        the header's spacing makes them meaningless (zero or not finite).
    """

    problems: list[str]
    image_features: np.ndarray | None


def _sidecar_modality(path: Path) -> str | None:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    side = path.with_name(name + ".json")
    if not side.is_file():
        return None
    try:
        value = json.loads(side.read_text()).get("Modality")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value).upper() if value else None


def header_modality(path: Path, img: nib.Nifti1Image) -> str | None:
    """``"MR"``, ``"CT"`` or another DICOM modality when the file says, else None."""
    side = _sidecar_modality(path)
    if side:
        return side
    descrip = bytes(np.asarray(img.header.get("descrip", b""))).decode(
        "latin-1", "replace"
    )
    return "MR" if _MR_DESCRIP.search(descrip) else None


def intensity_problems(data: np.ndarray) -> list[str]:
    """Why ``data`` is not CT in HU (empty when it looks like it is)."""
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return ["the scan has no finite voxel values"]
    lo, hi = (float(v) for v in np.percentile(finite, (1, 99)))
    air = float((finite <= AIR_HU).mean())
    if air < MIN_AIR_FRACTION:
        return [
            f"its intensities run from {lo:.0f} to {hi:.0f} (1st-99th percentile) "
            f"with {air:.1%} of voxels at air (at or below {AIR_HU:.0f} HU; an "
            "abdominal CT has several percent): this is not CT in Hounsfield "
            "units (an MRI, a CT saved without its rescale slope/intercept, or a "
            "crop inside the body?)"
        ]
    if hi <= AIR_HU:
        return ["almost every voxel is air (below -500 HU): no body in the scan"]
    return []


def looks_like_ct(data: np.ndarray) -> bool:
    """Whether ``data`` looks like CT in HU (:func:`intensity_problems` finds
    nothing: air at about -1000 HU, and a body)."""
    return not intensity_problems(data)


def intensity_kind(finite: np.ndarray) -> str | None:
    """What finite voxel values look like: ``"CT"`` (in HU: air at about
    -1000 and a body), ``"MR"`` (a magnitude image: no air at -1000, at most a
    trace of negative values) or None (neither). Counts only, no sorting, so
    it is cheap on every case of a site."""
    if finite.size == 0:
        return None
    air = float((finite <= AIR_HU).mean())
    if air >= MIN_AIR_FRACTION:
        return "CT" if air < NO_BODY_AIR_FRACTION else None
    hi = float(finite.max())
    if hi <= 0:
        return None
    negative = float((finite < -MR_NEGATIVE_SHARE * hi).mean())
    return "MR" if negative <= MR_NEGATIVE_FRACTION else None


def mr_intensity_problems(data: np.ndarray) -> list[str]:
    """Why ``data`` is not an MR magnitude image (empty when it looks like one).

    An MR image in the scanner's units has no air at -1000 (air is dark, about
    0) and no more than a trace of negative values (:func:`intensity_kind`).
    """
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return ["the scan has no finite voxel values"]
    if intensity_kind(finite) == "MR":
        return []
    air = float((finite <= AIR_HU).mean())
    if air >= MIN_AIR_FRACTION:
        return [
            f"this scan looks like CT in HU: {air:.1%} of its voxels are at or "
            f"below {AIR_HU:.0f} (air in Hounsfield units), which an MR image "
            "never has"
        ]
    lo, hi = (float(v) for v in np.percentile(finite, (1, 99)))
    if float(finite.max()) <= 0:
        return ["it holds no signal: no voxel is above 0"]
    return [
        f"its intensities run from {lo:.3g} to {hi:.3g} (1st-99th percentile): "
        "an MR magnitude image is not negative (a normalised, phase or "
        "subtraction image?)"
    ]


def modality_problems(data: np.ndarray, modality: str) -> list[str]:
    """Why ``data`` does not look like a scan of ``modality`` (``CT``, ``MR``
    or ``mixed``, a plan's); empty when it does.

    ``CT``: :func:`intensity_problems`, unchanged; ``MR``:
    :func:`mr_intensity_problems`; ``mixed``: either must find nothing.
    """
    if modality == "CT":
        return intensity_problems(data)
    if modality == "MR":
        return mr_intensity_problems(data)
    if not (ct := intensity_problems(data)) or not mr_intensity_problems(data):
        return []
    return [f"it is neither CT in HU nor MR: {ct[0]}"]


def geometry_problems(
    spacing: np.ndarray, shape: tuple[int, ...], plan: Plan, seen: dict[str, Any]
) -> list[str]:
    """Spacing or field of view outside what the run saw (or the plan allows)."""
    out = []
    extent = spacing * np.asarray(shape[:3], dtype=float)
    sp_txt = "x".join(f"{v:.2g}" for v in spacing)
    ext_txt = "x".join(f"{v:.0f}" for v in extent)
    if seen.get("spacing-mm-max"):
        factor, ref = COARSER_THAN_SEEN, seen["spacing-mm-max"]
        what = "the coarsest spacing the sites trained on"
    else:
        factor, ref = COARSER_THAN_PLAN, plan.spacing_mm
        what = "the model's spacing"
    if np.any(spacing > factor * np.asarray(ref, dtype=float)):
        ref_txt = "x".join(f"{v:.2g}" for v in ref)
        out.append(
            f"its voxel spacing {sp_txt} mm is more than {factor:g}x {what} "
            f"({ref_txt} mm): too coarse for what the model learned"
        )
    if seen.get("extent-mm-min"):
        floor = SMALLER_THAN_SEEN * np.asarray(seen["extent-mm-min"], dtype=float)
    else:
        floor = np.asarray([MIN_INPLANE_MM, MIN_INPLANE_MM, MIN_EXTENT_MM])
    if np.any(extent < floor):
        out.append(
            f"its field of view {ext_txt} mm is smaller than the scans the model "
            f"was trained on (at least {'x'.join(f'{v:.0f}' for v in floor)} mm): "
            f"a crop or a single slab, not an abdominal {_scan_name(plan)}"
        )
    return out


def _scan_name(plan: Plan) -> str:
    return plan.modality if plan.modality in ("CT", "MR") else "scan"


def ras_view(img: nib.Nifti1Image, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` and its voxel spacing with the axes in RAS order (a view, no copy).

    Flips are left alone: the features are the same either way; only which
    axis is left-right, anterior-posterior and inferior-superior matters.
    """
    world = nib.orientations.io_orientation(img.affine)[:, 0]
    order = [int(a) for a in np.argsort(world, kind="stable")]
    order += list(range(3, data.ndim))
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    return np.transpose(data, order), zooms[order[:3]]


def check_scan(path: Path, plan: Plan, seen: dict[str, Any] | None) -> ScanCheck:
    """Every way ``path`` differs from the model's training data, and the
    image features of its out-of-distribution score (one read of the scan).

    Parameters
    ----------
    path : Path
        A NIfTI scan.
    plan : Plan
        The checkpoint's effective plan (spacing, modality).
    seen : dict, optional
        The sidecar's ``seen-scans`` (``spacing-mm-max``, ``extent-mm-min``).
    """
    img = nib.load(str(path))
    modality = header_modality(path, img)
    trained = plan.modality
    problems = []
    if (
        modality
        and modality != trained
        and not (trained == "mixed" and modality in ("CT", "MR"))
    ):
        what = "CT and MR" if trained == "mixed" else trained
        problems.append(
            f"its header says modality {modality}; the model was trained on {what}"
        )
    data = np.asarray(img.dataobj, dtype=np.float32)
    found = modality_problems(data, trained)
    if trained == "MR" and found and looks_like_ct(data):
        found = [f"the model was trained on MR; {found[0]}"]
    problems += found
    spacing = np.asarray(img.header.get_zooms()[:3], dtype=float)
    problems += geometry_problems(spacing, img.shape, plan, seen or {})
    try:
        features = image_features(*ras_view(img, data))
    except ValueError:  # a broken spacing: the problems above already say so
        features = None
    return ScanCheck(problems, features)


def scan_problems(path: Path, plan: Plan, seen: dict[str, Any] | None) -> list[str]:
    """Every way ``path`` differs from the model's training data, as sentences
    (:func:`check_scan` without the features)."""
    return check_scan(path, plan, seen).problems
