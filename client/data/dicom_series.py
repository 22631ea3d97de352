"""DICOM image series: headers, the selection rules, geometry and voxels.

:func:`scan_folder` reads every file's header (never its pixels) and groups
the images by series; :func:`series_geometry` applies the rules that decide
whether a series can become a NIfTI volume (modality, not a localizer, enough
slices, axial, no gap, no gantry tilt) and builds the affine; :func:`rank_key`
orders the usable series of one patient; :func:`read_volume` reads the voxels
in Hounsfield units. ``docs/dicom.md`` states the rules and their tolerances.

Nothing here names a file, a patient or a full UID in a message: a series is
named by its SeriesNumber and the last characters of its UID, enough to find
it in the PACS and too few to mean anything outside the site.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)

MIN_SLICES = 20  # fewer cannot cover both kidneys at any usual slice spacing
AXIAL_TOLERANCE_DEG = 10.0  # slice normal vs the patient's head-foot axis
TILT_TOLERANCE_DEG = 0.5  # slice stacking direction vs the slice normal
SPACING_TOLERANCE = 0.05  # a step may differ from the median step by 5 %
GAP_FACTOR = 1.5  # a step this many median steps long is a missing slice
THIN_MM = 1.0  # prefer the thinnest slices at least this thick
CT_CLIP = (-1024, 3071)  # HU kept: air .. the 12-bit top; padding goes to air
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4",)  # Segmentation Storage
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_UID_LIKE = re.compile(r"\d+(\.\d+){3,}")


class SeriesRefused(Exception):
    """A series (or a SEG) that cannot be imported: ``reason`` and ``fix``;
    ``what`` names the object when the caller cannot know which one it was."""

    def __init__(self, reason: str, fix: str, what: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix
        self.what = what


@dataclass(frozen=True)
class Problem:
    """A series, SEG or object left out: what, why and the fix."""

    what: str
    reason: str
    fix: str

    def line(self) -> str:
        """One line for the terminal."""
        return f"{self.what}: {self.reason}; fix: {self.fix}"


@dataclass(frozen=True)
class Slice:
    """One single-frame image's header, as far as geometry needs it."""

    path: Path
    sop_uid: str
    # Empty when the header lacks it or holds no finite numbers:
    position: tuple[float, ...]  # ImagePositionPatient (LPS, mm), 3 values
    orientation: tuple[float, ...]  # ImageOrientationPatient, 6 cosines
    pixel_spacing: tuple[float, ...]  # between rows, between columns
    shape: tuple[int, int]  # rows, columns
    frames: int


@dataclass
class Series:
    """The images of one SeriesInstanceUID."""

    uid: str
    study_uid: str
    patient_key: str  # PatientID, or the study when the export blanked it
    modality: str
    number: int | None
    image_type: tuple[str, ...]
    slices: list[Slice] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``series 3 (uid …4f21a9)``: what messages call it."""
        number = "?" if self.number is None else str(self.number)
        return f"series {number} (uid …{self.uid[-6:]})"

    @property
    def original_primary(self) -> bool:
        """ImageType ORIGINAL\\PRIMARY (as acquired), not DERIVED/SECONDARY."""
        return self.image_type[:2] == ("ORIGINAL", "PRIMARY")


@dataclass
class Scan:
    """What a folder of DICOM files holds."""

    series: dict[str, Series] = field(default_factory=dict)
    seg_files: list[Path] = field(default_factory=list)
    rtstruct: list[str] = field(default_factory=list)  # labels of RTSTRUCT series
    other: dict[str, int] = field(default_factory=dict)  # modality -> objects
    not_dicom: int = 0  # not DICOM, or a header pydicom cannot parse


@dataclass(frozen=True)
class Geometry:
    """A usable series: slices sorted along the normal, voxel size, affine."""

    slices: list[Slice]  # sorted by position along the slice normal
    spacing: tuple[float, float, float]  # mm along NIfTI i (columns), j, k
    affine: np.ndarray  # voxel (column, row, slice) -> RAS mm

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxels along columns, rows, slices."""
        rows, cols = self.slices[0].shape
        return cols, rows, len(self.slices)


@contextmanager
def quiet_dicom_libraries() -> Iterator[None]:
    """Silence pydicom's and highdicom's own log records and warnings.

    They quote header values and UIDs (``SOP instance 1.2.840... is not ...``),
    which must not reach a site's logs; every refusal is reported by kidneyfl
    in its own words instead.
    """
    loggers = [logging.getLogger(name) for name in ("pydicom", "highdicom")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a blanket ignore: warnings quote values
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def scrub(text: str, limit: int = 160) -> str:
    """A library's error text with UID-like numbers removed, shortened."""
    return _UID_LIKE.sub("<uid>", text)[:limit]


def scan_folder(src: Path) -> Scan:
    """Read the header of every file under ``src`` and group the images.

    Files that are not DICOM (a DICOMDIR, notes, thumbnails) are counted, not
    reported by name: folder and file names of PACS exports often hold
    patient names.
    """
    scan, seen = Scan(), set[str]()
    for path in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            scan.not_dicom += 1
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        modality = str(ds.get("Modality", "")).upper()
        if sop_class in SEG_SOP_CLASSES or modality == "SEG":
            scan.seg_files.append(path)
            continue
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        if not series_uid or "Rows" not in ds:  # no image: RTSTRUCT, SR, PR...
            if sop_class == RTSTRUCT_SOP_CLASS or modality == "RTSTRUCT":
                scan.rtstruct.append(_bare_label(ds))
            else:
                scan.other[modality or "?"] = scan.other.get(modality or "?", 0) + 1
            continue
        try:
            image = _slice(ds, path)
            series = scan.series.get(series_uid) or _series(ds, series_uid, modality)
        except (TypeError, ValueError, AttributeError):  # a malformed value
            scan.not_dicom += 1
            continue
        scan.series[series_uid] = series
        if image.sop_uid not in seen:  # an image exported twice counts once
            seen.add(image.sop_uid)
            series.slices.append(image)
    scan.rtstruct = sorted(set(scan.rtstruct))
    return scan


def _bare_label(ds: pydicom.Dataset) -> str:
    uid = str(ds.get("SeriesInstanceUID", "")) or "?"
    return f"series {ds.get('SeriesNumber', '?')} (uid …{uid[-6:]})"


def _series(ds: pydicom.Dataset, uid: str, modality: str) -> Series:
    study = str(ds.get("StudyInstanceUID", ""))
    patient = str(ds.get("PatientID", "")).strip()
    number = ds.get("SeriesNumber")
    return Series(
        uid=uid,
        study_uid=study,
        patient_key=patient or f"study:{study or uid}",
        modality=modality,
        number=int(number) if number not in (None, "") else None,
        image_type=tuple(str(v).upper() for v in ds.get("ImageType", [])),
    )


def _floats(value: Any, n: int) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return ()
    return out if len(out) == n and all(np.isfinite(out)) else ()


def _slice(ds: pydicom.Dataset, path: Path) -> Slice:
    return Slice(
        path=path,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        shape=(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


def series_geometry(series: Series, modality: str, min_slices: int) -> Geometry:
    """Check ``series`` against the rules and build its NIfTI geometry.

    Raises
    ------
    SeriesRefused
        The first rule the series breaks, with the fix.
    """
    if series.modality != modality:
        other = "CT" if modality == "MR" else "MR"
        fix = (
            f"pass --modality {series.modality} if the site declared {other}"
            if series.modality == other
            else "nothing to do: only CT (or MR with --modality MR) is imported"
        )
        raise SeriesRefused(f"modality {series.modality or '?'}, not {modality}", fix)
    if "LOCALIZER" in series.image_type:
        raise SeriesRefused(
            "a localizer (scout) image", "nothing to do: scouts are not imported"
        )
    slices = series.slices
    if any(s.frames > 1 for s in slices):
        raise SeriesRefused(
            "multi-frame (enhanced) images",
            "export the series as classic single-frame images (a PACS export option)",
        )
    if not all(s.position and s.orientation and s.pixel_spacing for s in slices):
        raise SeriesRefused(
            "headers lack ImagePositionPatient, ImageOrientationPatient or "
            "PixelSpacing (a screenshot or secondary capture?)",
            "export the original reconstructed images",
        )
    first = slices[0]
    if any(
        s.shape != first.shape
        or not np.allclose(s.orientation, first.orientation, atol=1e-4)
        or not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=1e-4)
        for s in slices
    ):
        raise SeriesRefused(
            "slices differ in size, orientation or pixel spacing (several "
            "reconstructions in one series)",
            "export each reconstruction as its own series",
        )
    if len(slices) < min_slices:
        raise SeriesRefused(
            f"{len(slices)} slice(s), fewer than {min_slices}",
            "export the full series, or lower --min-slices",
        )
    row = np.array(first.orientation[:3], dtype=np.float64)
    col = np.array(first.orientation[3:], dtype=np.float64)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    off_axis = _degrees(abs(normal[2]))
    if off_axis > AXIAL_TOLERANCE_DEG:
        raise SeriesRefused(
            f"not axial: the slice normal is {off_axis:.0f} degrees from the "
            f"head-foot axis (at most {AXIAL_TOLERANCE_DEG:g} accepted)",
            "export the axial reconstruction of the scan",
        )
    ordered = sorted(slices, key=lambda s: float(np.dot(s.position, normal)))
    positions = np.array([s.position for s in ordered], dtype=np.float64)
    _check_steps(positions @ normal)
    stack = positions[-1] - positions[0]
    tilt = _degrees(float(np.dot(stack, normal) / np.linalg.norm(stack)))
    if tilt > TILT_TOLERANCE_DEG:
        raise SeriesRefused(
            f"gantry tilt: slices are stacked {tilt:.1f} degrees off their normal",
            "export a tilt-corrected reconstruction (kidneyfl does not resample "
            "tilted series)",
        )
    step = stack / (len(ordered) - 1)
    d_row, d_col = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row * d_col  # NIfTI i runs along a row: column index
    lps[:3, 1] = col * d_row  # j runs down a column: row index
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS -> NIfTI RAS
    spacing = (float(d_col), float(d_row), float(np.linalg.norm(step)))
    return Geometry(ordered, spacing, affine)


def _degrees(cosine: float) -> float:
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def _check_steps(along: np.ndarray) -> None:
    """Refuse duplicate positions, missing slices and irregular spacing."""
    steps = np.diff(along)
    median = float(np.median(steps))
    if median < 1e-3 or np.any(steps < 1e-3):
        raise SeriesRefused(
            "two or more slices at one position (several volumes, e.g. contrast "
            "phases, in one series)",
            "export each phase or volume as its own series",
        )
    for k, s in enumerate(steps):
        if s > GAP_FACTOR * median:
            missing = max(1, round(s / median) - 1)
            raise SeriesRefused(
                f"gap of {s:.2f} mm between sorted slices {k} and {k + 1}, where "
                f"the series steps {median:.2f} mm (about {missing} slice(s) "
                "missing)",
                "re-export the complete series from the PACS (kidneyfl does not "
                "interpolate missing slices)",
            )
    worst = float(np.max(np.abs(steps - median)))
    if worst > max(0.01, SPACING_TOLERANCE * median):
        raise SeriesRefused(
            f"irregular slice spacing: steps from {steps.min():.3f} to "
            f"{steps.max():.3f} mm (more than {SPACING_TOLERANCE:.0%} from the "
            f"median {median:.3f} mm)",
            "export a reconstruction with regular slice spacing",
        )


def rank_key(series: Series, geom: Geometry, has_seg: bool) -> tuple:
    """Sort key of the usable series of one patient: the smallest is chosen.

    In order: a SEG refers to it; ORIGINAL/PRIMARY; slices at least
    :data:`THIN_MM` thick, the thinnest first (thinner ones after, the
    thickest of those first); more slices; the lower SeriesNumber; the UID
    (only to be deterministic).
    """
    thick = geom.spacing[2]
    thin_rank = (0, thick) if thick >= THIN_MM - 1e-3 else (1, -thick)
    number = series.number if series.number is not None else 1 << 30
    return (
        not has_seg,
        not series.original_primary,
        *thin_rank,
        -len(geom.slices),
        number,
        series.uid,
    )


def why_not(chosen: tuple, other: tuple) -> str:
    """The first criterion of :func:`rank_key` on which ``other`` lost."""
    reasons = (
        "no SEG refers to it",
        "DERIVED/SECONDARY, not ORIGINAL/PRIMARY",
        f"slices thinner than {THIN_MM:g} mm",
        "thicker slices" if other[2] == 0 else "thinner slices",
        "fewer slices",
        "a higher series number",
        "same rank",
    )
    for reason, a, b in zip(reasons, chosen, other, strict=False):
        if a != b:
            return reason
    return reasons[-1]


def read_volume(geom: Geometry, modality: str) -> np.ndarray:
    """The series' voxels as a (columns, rows, slices) array.

    CT: RescaleSlope/RescaleIntercept applied, PixelPaddingValue set to air,
    clipped to :data:`CT_CLIP` and stored as int16 HU (rounding costs under
    half a HU). MR: slope and intercept applied, stored as float32.

    Raises
    ------
    SeriesRefused
        When the pixel data cannot be decoded.
    """
    ct = modality == "CT"
    volume = np.empty(geom.shape, np.int16 if ct else np.float32)  # no 2nd copy
    for k, s in enumerate(geom.slices):
        ds = None
        try:
            ds = pydicom.dcmread(s.path)
            raw = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for codecs
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
            raise SeriesRefused(
                f"pixel data cannot be decoded ({type(exc).__name__}: "
                f"{scrub(str(exc))}; transfer syntax {getattr(syntax, 'name', '?')})",
                "export the series uncompressed (Explicit VR Little Endian)",
            ) from None
        if raw.shape != s.shape:
            raise SeriesRefused(
                f"a slice's pixel data has shape {raw.shape}, its header says "
                f"{s.shape}",
                "re-export the series",
            )
        plane = raw.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1)
        plane += float(ds.get("RescaleIntercept", 0) or 0)
        if ct:
            padding = ds.get("PixelPaddingValue")
            if padding is not None:
                plane[raw == padding] = CT_CLIP[0]
            plane = np.rint(np.clip(plane, *CT_CLIP))
        volume[:, :, k] = plane.T  # (rows, cols) -> (cols, rows)
    return volume
