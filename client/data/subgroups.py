"""Patients' subgroups at a site: sex, age band, scanner, contrast phase.

A consortium must show that its model works for every group of patients, not
only on average. The site says which group each case belongs to in one of two
files in its data folder (``data.root``), read here and nowhere else:

- ``subgroups.csv``: a header ``case,sex,age,scanner,contrast_phase`` (any
  subset after ``case``, any order); ``case`` is the case id as the layout
  names it (``case_00012`` for KiTS-style folders, the image's file name
  without extension for a manifest);
- ``kits.json`` beside a KiTS21/23 layout (the challenge's clinical data):
  ``case_id``, ``gender`` and ``age_at_nephrectomy`` are read.

Values are normalised at the site before anything is computed: sex to ``f`` /
``m``; age (years) **binned here** into :data:`AGE_BANDS`, never kept raw;
scanner and contrast phase to a short lower-case token (letters, digits,
``_``). A value that is not one of these is an error naming the file, the row
and the fix (``kidneyfl site check`` reports it). A missing value leaves the
case out of that attribute's groups.

Only aggregates over each group leave the site, and only groups of at least the
site's floor of patients (``client/disclosure.py``: a group's metric is over
its own count ``sg-<attr>-<value>-cases-<region>``). Plain Python.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from client.data.errors import SiteDataError

SUBGROUPS_CSV = "subgroups.csv"
KITS_JSON = "kits.json"
ATTRIBUTES = ("sex", "age", "scanner", "phase")
_CSV_COLUMNS = {"sex": "sex", "age": "age", "scanner": "scanner"}
_CSV_COLUMNS["contrast_phase"] = "phase"
# Age bands (years): [lower, upper) with a name that is a wire token.
AGE_BANDS: tuple[tuple[float, float, str], ...] = (
    (0, 40, "u40"),
    (40, 60, "40to59"),
    (60, 70, "60to69"),
    (70, 200, "70plus"),
)
_SEX = {"f": "f", "female": "f", "w": "f", "m": "m", "male": "m"}
_TOKEN = re.compile(r"[a-z0-9_]{1,24}")

Groups = dict[str, dict[str, str]]  # case id -> attribute -> value


def age_band(value: str | float) -> str:
    """The band of an age in years (``ValueError`` if not a number in 0..120)."""
    years = float(value)
    if not 0 <= years <= 120:
        raise ValueError(f"age {years:g} is not in 0..120 years")
    return next(name for lo, hi, name in AGE_BANDS if lo <= years < hi)


def token(value: str) -> str:
    """A scanner or phase as a short token: lower case, runs of other
    characters as ``_`` (``"SIEMENS Somatom"`` -> ``siemens_somatom``)."""
    out = re.sub(r"[^a-z0-9]+", "_", value.strip().lower()).strip("_")[:24]
    if not _TOKEN.fullmatch(out):
        raise ValueError(f"{value!r} has no letter or digit")
    return out


def normalise(attribute: str, value: str) -> str:
    """One attribute's value as it is grouped (``ValueError`` when invalid)."""
    if attribute == "sex":
        if value.strip().lower() not in _SEX:
            raise ValueError(f"sex {value!r} is not f, m, female or male")
        return _SEX[value.strip().lower()]
    if attribute == "age":
        return age_band(value)
    return token(value)


def read_subgroups(root: Path | None) -> Groups:
    """Every case's subgroup values from ``root``'s ``subgroups.csv`` or
    ``kits.json`` (``subgroups.csv`` wins); empty when neither exists.

    Raises
    ------
    SiteDataError
        A file that cannot be read, an unknown column, or an invalid value
        (named with its row and the fix).
    """
    if root is None:
        return {}
    if (root / SUBGROUPS_CSV).is_file():
        return _from_csv(root / SUBGROUPS_CSV)
    if (root / KITS_JSON).is_file():
        return _from_kits(root / KITS_JSON)
    return {}


def _from_csv(path: Path) -> Groups:
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SiteDataError(
            f"{path}: cannot read ({exc}); save it as UTF-8 CSV"
        ) from None
    cols = [c.strip().lower() for c in (rows[0] if rows else [])]
    if not cols or cols[0] != "case" or set(cols[1:]) - set(_CSV_COLUMNS):
        raise SiteDataError(
            f"{path}: row 1: header {','.join(cols) or '(empty)'!r}; expected "
            "'case' then any of sex, age, scanner, contrast_phase"
        )
    out: Groups = {}
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(cols):
            raise SiteDataError(
                f"{path}: row {n}: {len(row)} fields but the header has {len(cols)}"
            )
        rec = dict(zip(cols, (c.strip() for c in row), strict=True))
        values = {}
        for col, attr in _CSV_COLUMNS.items():
            if rec.get(col):
                try:
                    values[attr] = normalise(attr, rec[col])
                except ValueError as err:
                    raise SiteDataError(
                        f"{path}: row {n}, column {col}: {err}; fix or empty the cell"
                    ) from None
        out[rec["case"]] = values
    return out


def _from_kits(path: Path) -> Groups:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SiteDataError(
            f"{path}: cannot read the KiTS clinical data ({exc})"
        ) from None
    if not isinstance(records, list):
        raise SiteDataError(f"{path}: expected a list of cases (KiTS21/23 kits.json)")
    out: Groups = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("case_id"), str):
            raise SiteDataError(f"{path}: entry {i} has no case_id")
        values = {}
        try:
            if rec.get("gender") not in (None, ""):
                values["sex"] = normalise("sex", str(rec["gender"]))
            if rec.get("age_at_nephrectomy") not in (None, ""):
                values["age"] = normalise("age", str(rec["age_at_nephrectomy"]))
            for key, attr in (("scanner", "scanner"), ("contrast_phase", "phase")):
                if rec.get(key) not in (None, ""):
                    values[attr] = normalise(attr, str(rec[key]))
        except ValueError as err:
            raise SiteDataError(
                f"{path}: {rec['case_id']}: {err}; fix the entry"
            ) from None
        out[rec["case_id"]] = values
    return out


def group_indices(case_ids: list[str], groups: Groups) -> dict[str, list[int]]:
    """``"<attr>-<value>"`` -> indices into ``case_ids`` of that group's cases."""
    out: dict[str, list[int]] = {}
    for i, case in enumerate(case_ids):
        for attr, value in sorted(groups.get(case, {}).items()):
            out.setdefault(f"{attr}-{value}", []).append(i)
    return out
