"""Per-case validation of NIfTI files: the one place that decides whether a case
is usable, shared by training (which skips bad cases) and the readiness check
(which reports them).

Each problem has its own kind, so a truncated file, an empty file, a 2D image and
a label with value 7 each get their own message and fix. Nothing here leaves the
site: findings name local files and are shown on the site's own terminal only.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

CT_RANGE = (-1100.0, 4000.0)  # HU a CT volume may plausibly span
SPACING_RANGE = (0.2, 10.0)  # mm
FATAL = "error"
WARN = "warning"


@dataclass(frozen=True)
class Finding:
    """One problem with one file."""

    kind: str
    severity: str  # "error": the case cannot be used; "warning": usable
    file: str
    message: str
    fix: str


@dataclass
class CaseReport:
    """What the inspection found for one case (site-local)."""

    findings: list[Finding] = field(default_factory=list)
    label_voxels: dict[int, int] = field(default_factory=dict)
    spacing: tuple[float, ...] = ()
    axcodes: str = ""
    # Digest of the image's voxels (shape, type, values): equal digests are the
    # same scan whatever the file's name or compression, so the same patient.
    image_digest: str = ""

    @property
    def usable(self) -> bool:
        """True when no finding is an error."""
        return not any(f.severity == FATAL for f in self.findings)


def _gzip_complete(path: Path) -> bool:
    # A cut-off .nii.gz often fails in nibabel's header parsing with a vague
    # message; reading the gzip stream to its end names the real problem.
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (EOFError, zlib.error):
        return False
    except gzip.BadGzipFile:
        return True  # not gzip at all: let nibabel say what it is
    return True


def _load(path: Path, what: str, report: CaseReport) -> nib.Nifti1Image | None:
    def bad(kind: str, msg: str, fix: str) -> None:
        report.findings.append(Finding(kind, FATAL, str(path), msg, fix))

    if not path.exists():
        bad(
            "missing", f"{what} file does not exist", "restore the file or fix the path"
        )
        return None
    if path.stat().st_size == 0:
        bad("empty", f"{what} file is empty (0 bytes)", "re-export or re-copy the file")
        return None
    try:
        if path.name.endswith(".gz") and not _gzip_complete(path):
            raise EOFError("gzip stream ends early")
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # full read: truncation shows here
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        bad(
            "truncated",
            f"{what} file is truncated or its compression is broken "
            f"({type(exc).__name__})",
            "re-copy the file; check the transfer finished",
        )
        return None
    except Exception as exc:  # nibabel raises many types for corrupt headers
        bad(
            "unreadable",
            f"{what} file is not readable NIfTI ({type(exc).__name__}: {exc})",
            "re-export the file as NIfTI (.nii or .nii.gz)",
        )
        return None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        bad(
            "not-3d",
            f"{what} is {data.ndim}D with shape {data.shape}; kidneyfl "
            "needs one 3D volume per file",
            "export a single 3D volume per case",
        )
        return None
    img.kidneyfl_data = data  # type: ignore[attr-defined]
    return img


def inspect_case(
    image: Path,
    label: Path | None,
    label_values: set[int] | frozenset[int] = frozenset({0, 1, 2, 3}),
    modality: str = "CT",
) -> CaseReport:
    """Open and check one case; never raises for bad files.

    Parameters
    ----------
    image, label : Path
        The case's files; ``label`` may be None (prediction only).
    label_values : set of int
        Label values the site's label map accepts.
    modality : str
        ``CT`` enables the Hounsfield-range check.
    """
    report = CaseReport()
    img = _load(image, "image", report)
    if img is not None:
        data = img.kidneyfl_data
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        report.spacing = zooms
        report.image_digest = voxel_digest(data)
        try:
            report.axcodes = "".join(nib.aff2axcodes(img.affine))
        except Exception:  # a singular affine has no orientation
            report.axcodes = "?"
        _check_image(image, data, zooms, report, modality)
    if label is None or img is None:
        return report
    lab = _load(label, "label", report)
    if lab is None:
        return report
    ldata = lab.kidneyfl_data
    if ldata.shape != img.kidneyfl_data.shape:
        report.findings.append(
            Finding(
                "shape-mismatch",
                FATAL,
                str(label),
                f"label shape {ldata.shape} differs from image shape "
                f"{img.kidneyfl_data.shape}",
                "re-export the segmentation on the image's grid",
            )
        )
        return report
    if not np.allclose(lab.affine, img.affine, atol=1e-3, rtol=1e-3):
        report.findings.append(
            Finding(
                "affine-mismatch",
                FATAL,
                str(label),
                "label affine (position/orientation/spacing) differs from the image's",
                "re-export the segmentation with the image's header",
            )
        )
    if not np.all(np.isfinite(ldata)) or np.any(ldata != np.round(ldata)):
        report.findings.append(
            Finding(
                "label-not-integer",
                FATAL,
                str(label),
                "label holds non-integer or non-finite values",
                "store the segmentation as an integer label map",
            )
        )
        return report
    values, counts = np.unique(ldata.astype(np.int64), return_counts=True)
    report.label_voxels = {int(v): int(c) for v, c in zip(values, counts, strict=True)}
    unknown = sorted(set(report.label_voxels) - set(label_values))
    if unknown:
        report.findings.append(
            Finding(
                "unknown-label",
                FATAL,
                str(label),
                f"label values {unknown} are not in the site's label map "
                f"{sorted(label_values)}",
                "fix the segmentation, or map these values in the site YAML",
            )
        )
    return report


def voxel_digest(data: np.ndarray) -> str:
    """SHA-256 of an array's shape, type and values (local only, never sent)."""
    h = hashlib.sha256(f"{data.shape}{data.dtype.str}".encode())
    h.update(np.ascontiguousarray(data).tobytes())
    return h.hexdigest()


def _check_image(
    path: Path,
    data: np.ndarray,
    zooms: tuple[float, ...],
    report: CaseReport,
    modality: str,
) -> None:
    add = report.findings.append
    if data.size == 0:
        add(
            Finding(
                "empty-volume",
                FATAL,
                str(path),
                "image has no voxels",
                "re-export the image",
            )
        )
        return
    finite = np.isfinite(data)
    if not finite.all():
        add(
            Finding(
                "non-finite",
                FATAL,
                str(path),
                f"{int((~finite).sum())} voxels are NaN or Inf",
                "re-export the image; check the conversion from DICOM",
            )
        )
        return
    lo, hi = float(data.min()), float(data.max())
    if modality.upper() == "CT" and (
        lo < CT_RANGE[0] or hi > CT_RANGE[1] or hi - lo < 200
    ):
        add(
            Finding(
                "ct-range",
                FATAL,
                str(path),
                f"intensities span {lo:.1f}..{hi:.1f}, not a CT in Hounsfield units",
                "export CT in HU (apply rescale slope/intercept, no normalisation)",
            )
        )
    if any(not SPACING_RANGE[0] <= z <= SPACING_RANGE[1] for z in zooms):
        add(
            Finding(
                "spacing",
                WARN,
                str(path),
                f"voxel spacing {tuple(round(z, 3) for z in zooms)} mm is unusual",
                "check the header's pixdim (mm) matches the scan",
            )
        )
