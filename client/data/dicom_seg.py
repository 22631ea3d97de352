"""DICOM SEG objects as kidneyfl label maps (0 background, 1 kidney, 2 tumour,
3 cyst), read with highdicom.

Each segment maps to a kidneyfl label by, in order: the site's segment map
(``--segment-map``: its label, then its code), the SNOMED CT code of its
segmented property type (:data:`DEFAULT_CODES`), its label
(:data:`DEFAULT_NAMES`). A segment nothing maps refuses the whole SEG, so a
structure is never silently dropped or mislabelled. A SEG must refer to the
series chosen for its patient, and each of its frames must lie where the image
it refers to lies; otherwise it is refused, never resampled.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np

from client.data.dicom_series import Geometry, Problem, Series, SeriesRefused, scrub
from client.data.errors import SiteDataError

KIDNEYFL_NAMES = {"background": 0, "kidney": 1, "tumour": 2, "tumor": 2, "cyst": 3}
LABEL_NAMES = {1: "kidney", 2: "tumour", 3: "cyst"}
# Overlapping segments: later wins. KiTS paints masses over the kidney and the
# tumour over a cyst, so a kidney segment that includes its tumour still works.
PAINT_ORDER = (1, 3, 2)
POSITION_TOLERANCE_MM = 0.05
# (coding scheme, code value) of the segmented property type -> kidneyfl label.
DEFAULT_CODES: dict[tuple[str, str], int] = {
    ("SCT", "64033007"): 1,  # Kidney (structure)
    ("SCT", "18639004"): 1,  # Left kidney
    ("SCT", "9846003"): 1,  # Right kidney
    ("SCT", "108369006"): 2,  # Neoplasm / Tumor
    ("SCT", "86049000"): 2,  # Malignant neoplasm, primary
    ("SCT", "372087000"): 2,  # Neoplasm, primary
    ("SCT", "702391001"): 2,  # Renal cell carcinoma
    ("SCT", "367643001"): 3,  # Cyst
}
# Segment labels, lower case, "_" and "-" read as spaces.
DEFAULT_NAMES: dict[str, int] = {
    **dict.fromkeys(["kidney", "kidneys", "left kidney", "right kidney"], 1),
    **dict.fromkeys(["kidney left", "kidney right", "renal parenchyma"], 1),
    **dict.fromkeys(["tumor", "tumour", "kidney tumor", "kidney tumour"], 2),
    **dict.fromkeys(["renal tumor", "renal tumour", "renal cell carcinoma"], 2),
    **dict.fromkeys(["cyst", "kidney cyst", "renal cyst", "cysts"], 3),
}
SEGMENT_MAP_HEADER = "segment,label"
ANY_SEGMENT = "*"  # a segment-map row for every segment nothing else maps


@dataclass
class SegObject:
    """A SEG that refers to exactly one image series."""

    seg: hd.seg.Segmentation
    series_uid: str  # the image series its frames were drawn on
    label: str  # what messages call it

    def segments(self) -> list[tuple[int, str, tuple[str, str, str]]]:
        """(number, label, (scheme, code, meaning)) of each segment."""
        out = []
        for n in self.seg.segment_numbers:
            desc = self.seg.get_segment_description(n)
            prop = desc.SegmentedPropertyTypeCodeSequence[0]
            code = (
                str(prop.get("CodingSchemeDesignator", "")).upper(),
                str(prop.get("CodeValue", "")),
                str(prop.get("CodeMeaning", "")),
            )
            out.append((n, str(desc.get("SegmentLabel", "")), code))
        return out


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[_\-]", " ", text).lower().split())


def read_segment_map(path: Path) -> dict[str, int]:
    """A CSV ``segment,label``: a segment label, ``SCHEME:CODE`` (e.g.
    ``SCT:64033007``) or ``*`` -> background, kidney, tumour (tumor) or cyst.

    Raises
    ------
    SiteDataError
        Unreadable file, wrong header or an unknown kidneyfl label; the message
        names the file, the row and the fix.
    """
    try:
        rows = list(csv.reader(Path(path).read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SiteDataError(
            f"{path}: cannot read the segment map ({type(exc).__name__}); save it "
            f"as a UTF-8 CSV with header '{SEGMENT_MAP_HEADER}'"
        ) from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if header != SEGMENT_MAP_HEADER.split(","):
        raise SiteDataError(
            f"{path}: row 1: header is {','.join(header) or '(empty)'!r}; expected "
            f"'{SEGMENT_MAP_HEADER}'"
        )
    out: dict[str, int] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != 2 or row[1].strip().lower() not in KIDNEYFL_NAMES:
            raise SiteDataError(
                f"{path}: row {n}: expected 'segment,label' with label one of "
                "background, kidney, tumour, cyst"
            )
        key = row[0].strip()
        out[key.upper() if _is_code(key) else _norm(key)] = KIDNEYFL_NAMES[
            row[1].strip().lower()
        ]
    return out


def _is_code(key: str) -> bool:
    return re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*:\S+", key) is not None


def load_seg(path: Path) -> SegObject:
    """Read a SEG file and the one image series it refers to.

    Raises
    ------
    SeriesRefused
        Not a readable SEG, or it refers to no or several image series.
    """
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises many types for bad objects
        raise SeriesRefused(
            f"a SEG that highdicom cannot read ({type(exc).__name__}: "
            f"{scrub(str(exc))})",
            "re-export the segmentation as DICOM SEG",
        ) from None
    uid = str(seg.get("SeriesInstanceUID", "")) or "?"
    label = f"SEG series {seg.get('SeriesNumber', '?')} (uid …{uid[-6:]})"
    series = {s for _, s, _ in seg.get_source_image_uids()}
    if len(series) != 1:
        raise SeriesRefused(
            f"{label} refers to {len(series)} image series, not one",
            "export one SEG per image series",
        )
    return SegObject(seg, series.pop(), label)


def load_segs(paths: list[Path]) -> tuple[dict[str, list[SegObject]], list[Problem]]:
    """The SEG files by the image series they refer to, and those refused."""
    segs: dict[str, list[SegObject]] = {}
    refused = []
    for path in paths:
        try:
            obj = load_seg(path)
        except SeriesRefused as exc:
            refused.append(Problem("a SEG object", exc.reason, exc.fix))
            continue
        segs.setdefault(obj.series_uid, []).append(obj)
    return segs, refused


def unused_seg(obj: SegObject, series: Series | None) -> Problem:
    """Why a SEG was applied to no case: its series is absent or not chosen."""
    if series is None:
        return Problem(
            obj.label,
            "refers to an image series that is not in the export",
            "export the SEG's image series too",
        )
    return Problem(
        obj.label,
        f"refers to {series.label}, not the series chosen for its patient (listed "
        "above with why)",
        "draw the SEG on the chosen series, or fix the series it refers to",
    )


def rtstruct_problems(labels: list[str]) -> list[Problem]:
    """Each RTSTRUCT found, refused with the conversion to use instead."""
    return [
        Problem(
            f"RTSTRUCT {label}",
            "RT structure sets are not imported (contours need rasterising, "
            "which no maintained library does reliably)",
            "convert it to DICOM SEG on the CT series (docs/dicom.md: 3D "
            "Slicer with SlicerRT) and rerun",
        )
        for label in labels
    ]


def map_segments(obj: SegObject, segment_map: dict[str, int]) -> dict[int, int]:
    """Segment number -> kidneyfl label for every segment of ``obj``.

    Raises
    ------
    SeriesRefused
        When a segment maps to nothing (naming it and the fix).
    """
    out, unmapped = {}, []
    for number, label, (scheme, code, meaning) in obj.segments():
        value = segment_map.get(_norm(label))
        if value is None:
            value = segment_map.get(f"{scheme}:{code}".upper())
        if value is None:
            value = DEFAULT_CODES.get((scheme, code))
        if value is None:
            value = DEFAULT_NAMES.get(_norm(label))
        if value is None:
            value = segment_map.get(ANY_SEGMENT)
        if value is None:
            unmapped.append(f"{number} {label!r} ({scheme}:{code} {meaning})")
        else:
            out[number] = value
    if unmapped:
        raise SeriesRefused(
            f"segment(s) {'; '.join(unmapped)} map to no kidneyfl label",
            "pass --segment-map CSV with rows 'segment,label' (label background, "
            "kidney, tumour or cyst; '*,background' for all other segments)",
            obj.label,
        )
    return out


def seg_labels(
    objs: list[SegObject], geom: Geometry, segment_map: dict[str, int]
) -> np.ndarray:
    """The SEGs of one series as a uint8 (columns, rows, slices) label map.

    Raises
    ------
    SeriesRefused
        An unmapped segment, frames that do not lie on the series' images, or
        pixels highdicom cannot decode.
    """
    rows, cols = geom.slices[0].shape
    masks = {v: np.zeros((len(geom.slices), rows, cols), bool) for v in PAINT_ORDER}
    uids = [s.sop_uid for s in geom.slices]
    for obj in objs:
        mapping = map_segments(obj, segment_map)
        _check_frames(obj, geom)
        wanted = [n for n, v in mapping.items() if v > 0]
        if not wanted:
            continue
        try:
            pixels = obj.seg.get_pixels_by_source_instance(
                uids,
                segment_numbers=wanted,
                ignore_spatial_locations=True,  # _check_frames checked them
                assert_missing_frames_are_empty=True,
                skip_overlap_checks=True,  # overlaps are resolved by PAINT_ORDER
            )
        except Exception as exc:  # highdicom raises many types
            raise SeriesRefused(
                f"its pixels cannot be read ({type(exc).__name__}: {scrub(str(exc))})",
                "re-export the segmentation as DICOM SEG",
                obj.label,
            ) from None
        for i, n in enumerate(wanted):
            masks[mapping[n]] |= pixels[..., i] >= 0.5  # fractional: half or more
    out = np.zeros((len(geom.slices), rows, cols), np.uint8)
    for value in PAINT_ORDER:
        out[masks[value]] = value
    return np.ascontiguousarray(out.transpose(2, 1, 0))  # (cols, rows, slices)


def _check_frames(obj: SegObject, geom: Geometry) -> None:
    seg, first = obj.seg, geom.slices[0]
    refuse = "re-export the SEG on the chosen series' own images (same grid)"
    if (int(seg.Rows), int(seg.Columns)) != first.shape:
        raise SeriesRefused(
            f"frames are {seg.Rows}x{seg.Columns} pixels, the "
            f"images {first.shape[0]}x{first.shape[1]}",
            refuse,
            obj.label,
        )
    shared = seg.SharedFunctionalGroupsSequence[0]
    for seq, attr, value in (
        ("PlaneOrientationSequence", "ImageOrientationPatient", first.orientation),
        ("PixelMeasuresSequence", "PixelSpacing", first.pixel_spacing),
    ):
        if seq in shared and attr in shared[seq][0]:
            mine = [float(v) for v in shared[seq][0][attr].value]
            if not np.allclose(mine, value, atol=1e-3):
                raise SeriesRefused(f"its {attr} differs", refuse, obj.label)
    where = {s.sop_uid: np.array(s.position) for s in geom.slices}
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        try:
            ref = group.DerivationImageSequence[0].SourceImageSequence[0]
            source = str(ref.ReferencedSOPInstanceUID)
        except (AttributeError, IndexError):
            raise SeriesRefused(
                f"frame {f} does not name the image it was drawn on",
                refuse,
                obj.label,
            ) from None
        if source not in where:
            raise SeriesRefused(
                f"frame {f} refers to an image outside the chosen series",
                refuse,
                obj.label,
            )
        if "PlanePositionSequence" in group:
            plane = group.PlanePositionSequence[0]
            pos = np.array([float(v) for v in plane.ImagePositionPatient])
            off = float(np.linalg.norm(pos - where[source]))
            if off > POSITION_TOLERANCE_MM:
                raise SeriesRefused(
                    f"frame {f} lies {off:.2f} mm from the image it refers to",
                    refuse,
                    obj.label,
                )
