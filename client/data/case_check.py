"""Per-case validation of NIfTI files: the one place that decides whether a case
is usable, shared by training (which skips bad cases) and the readiness check
(which reports them).

Each problem has its own kind, so a truncated file, an empty file, a 2D image and
a label with value 7 each get their own message and fix. Nothing here leaves the
site: findings name local files and are shown on the site's own terminal only.

The inspection records what an image's intensities look like (CT in HU, an MR
magnitude image, or neither: :func:`client.scan_check.intensity_kind`);
:func:`declared_findings` compares that with the site's ``data.modality``
(issue 29), so a CT among an MR site's scans, or an MR among a CT site's, is an
error naming the file and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from client.scan_check import AIR_HU, intensity_kind

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
    # What the intensities look like: "CT" (HU), "MR" (magnitudes), "" (neither);
    # None when they were not looked at (unreadable, empty or non-finite image).
    looks_like: str | None = None

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
        ``CT`` enables the Hounsfield-range check (``MR``: none). Whether the
        image looks like the site's modality is :func:`declared_findings`'s
        question, from the report's ``looks_like``.
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
    report.looks_like = intensity_kind(data) or ""
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


def declared_findings(report: CaseReport, image: Path, modality: str) -> list[Finding]:
    """A case's findings for a site whose ``data.modality`` is ``modality``.

    The inspection's own findings (less the Hounsfield-range check for an MR
    site), and whether the image looks like the declared modality: an image
    that looks like the other one is an error; one that looks like neither, a
    warning.

    Parameters
    ----------
    report : CaseReport
        The case's inspection (any ``modality`` argument).
    image : Path
        The case's image, as inspected.
    modality : str
        The site's ``data.modality``: ``CT`` or ``MR``.
    """
    found = [f for f in report.findings if modality == "CT" or f.kind != "ct-range"]
    kind = report.looks_like
    if kind is None or kind == modality:  # None: the image's error says why
        return found
    where = f"{image.parent.name}/{image.name}"
    if kind:  # the other modality
        what = (
            f"CT in HU (voxels at air, {AIR_HU:.0f} HU or below)"
            if kind == "CT"
            else "MR (no air at -1000 HU, no negative values)"
        )
        fix = (
            f"set data.modality: {kind} if the site's scans are {kind}; otherwise "
            f"remove this scan or export it as {modality}"
        )
        if modality == "CT":
            fix += " in HU (apply the rescale slope and intercept)"
        found.append(
            Finding(
                "modality",
                FATAL,
                str(image),
                f"data.modality says {modality} but {where} looks like {what}",
                fix,
            )
        )
        return found
    expected = (
        "no air at about -1000 HU, or nothing but air: not CT in HU, or a crop "
        "inside the body"
        if modality == "CT"
        else "many negative values: not an MR magnitude image (normalised, phase "
        "or subtraction?)"
    )
    found.append(
        Finding(
            "modality-intensities",
            WARN,
            str(image),
            f"data.modality says {modality} but {where} has {expected}",
            "check how the scans were exported (the scanner's own values: HU for "
            "CT, magnitudes for MR)",
        )
    )
    return found
