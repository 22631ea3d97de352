"""The CSV manifest the tasks read: ``image,label[,split][,patient]`` and,
for prognosis, ``time,event`` with optional ``age,sex,size_cm``.

One row per image, a header naming the columns in any order. ``image`` is
relative to the manifest's folder (or absolute); ``label`` is a label file
(segmentation) or a class name (classification), empty when there is none
(prediction only); ``split`` is ``train``, ``validation`` (or ``val``),
``test`` (never trained or validated on) or empty (split by the site YAML);
``patient`` is the patient's id (empty: the image is its own patient).
``time`` (days of follow-up), ``event`` (1 happened, 0 censored), ``age``,
``sex`` and ``size_cm`` are the patient's outcome and covariates, carried here
as the cells say and checked by :mod:`client.data.outcomes` (empty: none).
Other columns are refused, so a typo in a column name is not silently ignored.
Errors name the file, the row and the fix.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from client.data.errors import SiteDataError

MANIFEST = "manifest.csv"
HEADER = "image,label[,split][,patient][,time,event][,age,sex,size_cm]"
REQUIRED = ("image", "label")
OUTCOME_COLUMNS = ("time", "event", "age", "sex", "size_cm")
OPTIONAL = ("split", "patient", *OUTCOME_COLUMNS)
# What the split column may say -> the split it means ("" = not pinned).
SPLITS = {"train": "train", "validation": "validation", "val": "validation"}
SPLITS |= {"test": "test", "": ""}


@dataclass(frozen=True)
class ManifestRow:
    """One non-empty row of a manifest, cells stripped."""

    row: int  # the row's number in the file (the header is row 1)
    image: Path  # resolved against the manifest's folder
    label: str
    split: str  # "train", "validation", "test" or "" (not pinned)
    patient: str
    # The prognosis columns' cells, unchecked (client.data.outcomes reads them).
    time: str = ""
    event: str = ""
    age: str = ""
    sex: str = ""
    size_cm: str = ""

    def where(self, path: Path) -> str:
        """``<manifest>: row <n>`` for error messages."""
        return f"{path}: row {self.row}"


def read_manifest_rows(path: Path) -> list[ManifestRow]:
    """Parse a manifest's rows (blank rows skipped).

    Raises
    ------
    SiteDataError
        Missing or unreadable file, a header without image and label or with
        other columns, a row with the wrong number of fields, an empty image
        cell or an unknown split.
    """
    rows = _rows(path)
    cols = [c.strip().lower() for c in (rows[0] if rows else [])]
    if (
        len(set(cols)) != len(cols)
        or not set(REQUIRED) <= set(cols)
        or set(cols) - set(REQUIRED) - set(OPTIONAL)
    ):
        raise SiteDataError(
            f"{path}: row 1: header is {','.join(cols) or '(empty)'!r}; expected "
            f"'{HEADER}' (one row per image, label empty if none)"
        )
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if any(cell.strip() for cell in row):
            out.append(_parse(path, n, cols, row))
    return out


def _rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise SiteDataError(
            f"{path}: manifest not found; write a CSV with header '{HEADER}' or "
            "set data.manifest in the site YAML to its path"
        )
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
        return list(csv.reader(text.splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SiteDataError(
            f"{path}: cannot read the manifest ({exc}); save it as UTF-8 CSV"
        ) from None


def _parse(path: Path, n: int, cols: list[str], row: list[str]) -> ManifestRow:
    if len(row) != len(cols):
        raise SiteDataError(
            f"{path}: row {n}: {len(row)} fields but the header has {len(cols)}; "
            "quote file names that contain commas"
        )
    rec = dict(zip(cols, (c.strip() for c in row), strict=True))
    if not rec["image"]:
        raise SiteDataError(f"{path}: row {n}: the image path is empty; fill it in")
    split = rec.get("split", "")
    if split.lower() not in SPLITS:
        raise SiteDataError(
            f"{path}: row {n}: unknown split {split!r}; use train, validation, "
            "test or leave it empty"
        )
    image = Path(rec["image"]).expanduser()
    return ManifestRow(
        n,
        image if image.is_absolute() else path.parent / image,
        rec["label"],
        SPLITS[split.lower()],
        rec.get("patient", ""),
        *(rec.get(col, "") for col in OUTCOME_COLUMNS),
    )


def manifest_columns(path: Path) -> list[str]:
    """The header's column names, lower case (``SiteDataError`` when the file
    is missing or unreadable; the header itself is not checked)."""
    rows = _rows(path)
    return [c.strip().lower() for c in (rows[0] if rows else [])]


def manifest_labels(path: Path) -> tuple[str, ...]:
    """The distinct non-empty labels of a manifest, sorted (no checks beyond
    the header's): what a site without a plan calls its classes."""
    return tuple(sorted({r.label for r in read_manifest_rows(path)} - {""}))


def case_ids(images: list[Path]) -> list[str]:
    """One id per image: its file name without ``.nii.gz``/``.nii``/``.png``,
    made unique by :func:`dedupe` (both tasks name cases so)."""
    return dedupe([file_stem(p) for p in images])


def file_stem(path: Path) -> str:
    """A file's name without its extension, ``.nii.gz`` counting as one."""
    name = path.name
    return name[:-7] if name.lower().endswith(".nii.gz") else path.stem


def dedupe(ids: list[str]) -> list[str]:
    """``ids`` with ``_2``, ``_3``, ... added to repeats, in order."""
    seen: set[str] = set()
    out = []
    for cid in ids:
        new, n = cid, 1
        while new in seen:
            n += 1
            new = f"{cid}_{n}"
        seen.add(new)
        out.append(new)
    return out
