"""Patients' outcomes at a site, for the prognosis task (issue 30).

Each patient's follow-up time (days) and event (1: the event, death, happened;
0: censored, alive at the last follow-up), plus optional pre-operative
covariates. Read at the site and never sent. The first of these that exists is
the source (a log line says which):

1. ``outcomes.csv`` in ``data.root`` (any layout): a header ``case,time,event``
   then any of ``age,sex,size_cm``, in any order; ``case`` is the case id as the
   layout names it (``case_00012`` for KiTS-style folders, the image's file
   name without extension for a manifest);
2. the manifest's own ``time`` and ``event`` columns (and ``age``, ``sex``,
   ``size_cm``), when the site's layout is a manifest that has them;
3. ``kits.json`` beside a KiTS layout (the challenge's clinical data):
   ``vital_status``, ``vital_days_after_surgery``, ``age_at_nephrectomy``,
   ``gender`` and ``radiographic_size``; other keys are ignored.

What each value may be:

- **time**: days from surgery (or the scan) to the event or the last
  follow-up, a finite number > 0 and at most 100 years. **0 is refused**: a
  patient followed for no time is in no risk set and adds nothing to a survival
  likelihood, and a 0 is usually a missing date; an event on the day of
  surgery is written 1.
- **event**: ``1`` or ``0``, or the vital-status words ``dead`` / ``deceased``
  (1) and ``censored`` / ``alive`` (0), any case. ``true``/``false``,
  ``yes``/``no`` and ``1.0`` are refused: whether "true" means died or
  censored is the mistake to catch, not to guess.
- **age** is binned at once (:func:`client.data.subgroups.age_band`; the raw
  age is not kept), **sex** is ``f`` / ``m`` (the subgroups' normaliser),
  **size_cm** is the tumour's size in cm, 0 to 50.

A row or entry with neither time nor event is a case without an outcome (left
out of prognosis, not an error); one without the other is an error. Every
error names the file, the row or entry, and the fix; ``kidneyfl site check``
lists them all (:mod:`client.data.outcome_check`). Plain Python.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.data.errors import SiteDataError
from client.data.manifest import (
    MANIFEST,
    case_ids,
    manifest_columns,
    read_manifest_rows,
)
from client.data.subgroups import KITS_JSON, normalise
from common.config import SiteConfig

log = logging.getLogger(__name__)

OUTCOMES_CSV = "outcomes.csv"
OUTCOME_FILES = (OUTCOMES_CSV, KITS_JSON)
COVARIATES = ("age", "sex", "size")
CSV_HEADER = "case,time,event[,age][,sex][,size_cm]"
MAX_DAYS = 36_525.0  # 100 years: more is a date or another unit
MAX_SIZE_CM = 50.0
EVENTS = {"1": 1, "0": 0, "dead": 1, "deceased": 1, "censored": 0, "alive": 0}
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_CSV_COLUMNS = {"case", "time", "event", "age", "sex", "size_cm"}
# attribute -> the fix an invalid value's message ends with
_FIX = {
    "time": "write the days from surgery (or the scan) to the event or the last "
    "follow-up, a number > 0, or empty both time and event",
    "event": "write 1 if the event (death) happened, 0 if censored (alive at the "
    "last follow-up)",
    "age": "write the age in years (0-120) or empty it",
    "sex": "write f or m (female, male) or empty it",
    "size": f"write the tumour's size in cm (0 to {MAX_SIZE_CM:g}) or empty it",
}
_KITS_KEYS = {"time": "vital_days_after_surgery", "event": "vital_status"}
_KITS_KEYS |= {"age": "age_at_nephrectomy", "sex": "gender"}
_KITS_KEYS["size"] = "radiographic_size"


@dataclass(frozen=True)
class Outcome:
    """One patient's outcome and covariates, as the site keeps them."""

    time: float  # days of follow-up, > 0 (0 is refused: no information)
    event: int  # 1: the event happened; 0: censored
    age_band: str | None  # client.data.subgroups.age_band; the raw age is not kept
    sex: str | None  # "f" / "m"
    size_cm: float | None  # the tumour's size


@dataclass(frozen=True)
class _Problem:
    """One invalid file, row or entry; ``where`` excludes the file's path."""

    kind: str  # the readiness finding's kind
    where: str  # "row 3, column time", "entry 2 (case_00002), key gender"
    message: str
    fix: str

    @property
    def located(self) -> str:
        """``where: message`` (just the message for a whole-file problem)."""
        return f"{self.where}: {self.message}" if self.where else self.message

    def text(self, path: Path) -> str:
        """The problem as a :class:`SiteDataError` says it."""
        return f"{path}: {self.located}; {self.fix}"


_Parsed = tuple[dict[str, Outcome], list[_Problem]]
# attribute -> how an outcomes.csv or manifest error names its cell
_COLUMNS = {a: f"column {a}" for a in ("time", "event", "age", "sex")}
_COLUMNS["size"] = "column size_cm"


@dataclass
class _Read:
    """What one source gave: outcomes by case id and every problem found."""

    kind: str  # "outcomes.csv", "manifest" or "kits.json"
    path: Path
    outcomes: dict[str, Outcome]
    problems: list[_Problem]


def outcome_source(site: SiteConfig) -> Path | None:
    """The file the site's outcomes come from, or None when there is none:
    ``outcomes.csv``, else a manifest with ``time``/``event`` columns, else
    ``kits.json`` (all in ``data.root``; the manifest where the layout says)."""
    found = _source(site)
    return found[1] if found else None


def read_outcomes(site: SiteConfig) -> dict[str, Outcome]:
    """Every case's outcome (case id -> :class:`Outcome`); empty when the site
    has no outcome source. Cases without one are absent.

    Raises
    ------
    SiteDataError
        The source cannot be read, its header is wrong, a case is repeated, or
        a value is invalid; the message names the file, the row (or entry) and
        the fix, and how many more problems ``kidneyfl site check`` lists.
    """
    read = _read(site)
    if read is None:
        log.info("outcomes: none (no outcomes.csv, manifest time/event, kits.json)")
        return {}
    if read.problems:
        first, more = read.problems[0], len(read.problems) - 1
        extra = f" ({more} more problem(s): kidneyfl site check lists them)"
        raise SiteDataError(first.text(read.path) + (extra if more else ""))
    events = sum(o.event for o in read.outcomes.values())
    log.info(
        "outcomes from %s (%s): %d case(s), %d event(s)",
        read.path,
        read.kind,
        len(read.outcomes),
        events,
    )
    return read.outcomes


def _source(site: SiteConfig) -> tuple[str, Path] | None:
    root = site.data.root
    if (root / OUTCOMES_CSV).is_file():
        return OUTCOMES_CSV, root / OUTCOMES_CSV
    manifest = _manifest_with_outcomes(site)
    if manifest is not None:
        return "manifest", manifest
    if (root / KITS_JSON).is_file():
        return KITS_JSON, root / KITS_JSON
    return None


def _manifest_with_outcomes(site: SiteConfig) -> Path | None:
    d = site.data
    if d.manifest is None and d.layout not in ("auto", "manifest"):
        return None
    path = d.manifest or d.root / MANIFEST
    if not path.is_file():
        return None
    try:
        cols = manifest_columns(path)
    except SiteDataError:
        return None  # the layout's own check names an unreadable manifest
    return path if {"time", "event"} & set(cols) else None


def _read(site: SiteConfig) -> _Read | None:
    found = _source(site)
    if found is None:
        return None
    kind, path = found
    readers = {OUTCOMES_CSV: _from_csv, "manifest": _from_manifest}
    outcomes, problems = readers.get(kind, _from_kits)(path)
    return _Read(kind, path, outcomes, problems)


def _from_csv(path: Path) -> _Parsed:
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return {}, [_unreadable(f"cannot read ({exc})", "save it as UTF-8 CSV")]
    cols = [c.strip().lower() for c in (rows[0] if rows else [])]
    unknown = set(cols) - _CSV_COLUMNS
    lacking = {"case", "time", "event"} - set(cols)
    if len(set(cols)) != len(cols) or unknown or lacking:
        message = f"header {','.join(cols) or '(empty)'!r}"
        fix = f"write the header '{CSV_HEADER}' (any order), one row per case"
        return {}, [_Problem("outcomes-header", "row 1", message, fix)]
    out: dict[str, Outcome] = {}
    problems: list[_Problem] = []
    first: dict[str, int] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(cols):
            message = f"{len(row)} fields but the header has {len(cols)}"
            fix = "give every row one cell per column (empty cells allowed)"
            problems.append(_Problem("outcomes-row", f"row {n}", message, fix))
            continue
        rec = dict(zip(cols, (c.strip() for c in row), strict=True))
        case = rec["case"]
        if not case or case in first:
            message = f"case {case} is also in row {first[case]}" if case else ""
            fix = "keep one row per case, named as the layout names it"
            problems.append(
                _Problem("outcomes-case", f"row {n}", message or "no case id", fix)
            )
            continue
        first[case] = n
        cells = {a: rec.get(a, "") for a in ("time", "event", "age", "sex")}
        cells["size"] = rec.get("size_cm", "")
        _add(out, problems, case, f"row {n}", cells, _COLUMNS)
    return out, problems


def _from_manifest(path: Path) -> _Parsed:
    try:
        cols = manifest_columns(path)
        rows = read_manifest_rows(path)
    except SiteDataError as exc:
        # the manifest's own message starts with its path; the finding names it
        message = str(exc).removeprefix(f"{path}: ")
        return {}, [_unreadable(message, "fix the manifest")]
    if not {"time", "event"} <= set(cols):
        has, lacks = ("time", "event") if "time" in cols else ("event", "time")
        message = f"the manifest has a {has} column but no {lacks}"
        fix = "add the other column (both cells empty: no outcome) or remove this one"
        return {}, [_Problem("outcomes-header", "row 1", message, fix)]
    out: dict[str, Outcome] = {}
    problems: list[_Problem] = []
    by_patient: dict[str, tuple[int, Outcome]] = {}
    for case, r in zip(case_ids([r.image for r in rows]), rows, strict=True):
        cells = {"time": r.time, "event": r.event, "age": r.age, "sex": r.sex}
        cells["size"] = r.size_cm
        got = _add(out, problems, case, f"row {r.row}", cells, _COLUMNS)
        if got is None or not r.patient:
            continue
        row, seen = by_patient.setdefault(r.patient, (r.row, got))
        if (seen.time, seen.event) != (got.time, got.event):
            message = f"patient {r.patient} has another time or event in row {row}"
            fix = "give every scan of a patient the patient's one outcome"
            problems.append(_Problem("outcomes-patient", f"row {r.row}", message, fix))
    return out, problems


def _from_kits(path: Path) -> _Parsed:
    fix = "restore the challenge's kits.json (a JSON list of cases)"
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {}, [_unreadable(f"cannot read the KiTS clinical data ({exc})", fix)]
    if not isinstance(records, list):
        return {}, [_unreadable("expected a list of cases (KiTS21/23 kits.json)", fix)]
    out: dict[str, Outcome] = {}
    problems: list[_Problem] = []
    first: dict[str, int] = {}
    names = {a: f"key {k}" for a, k in _KITS_KEYS.items()}
    for i, rec in enumerate(records):
        cid = rec.get("case_id") if isinstance(rec, dict) else None
        if not isinstance(cid, str) or not cid.strip() or cid in first:
            message = f"case {cid} is also entry {first[cid]}" if cid in first else ""
            message = message or "no case_id"
            fix = "give every entry its own case_id"
            problems.append(_Problem("outcomes-case", f"entry {i}", message, fix))
            continue
        first[cid] = i
        cells = {a: rec.get(k) for a, k in _KITS_KEYS.items()}
        _add(out, problems, cid, f"entry {i} ({cid})", cells, names)
    return out, problems


def _unreadable(message: str, fix: str) -> _Problem:
    return _Problem("outcomes-unreadable", "", message, fix)


def _add(
    out: dict[str, Outcome],
    problems: list[_Problem],
    case: str,
    where: str,
    cells: dict[str, Any],
    names: dict[str, str],
) -> Outcome | None:
    """One row's or entry's cells (attribute -> raw value) into ``out``, or its
    first invalid value into ``problems``; None when it has no outcome or an
    invalid one."""
    no_time, no_event = _empty(cells["time"]), _empty(cells["event"])
    if no_time and no_event:
        return None  # a case without an outcome; its covariates are not used
    values: dict[str, Any] = {}
    for attr, parse in _PARSERS.items():
        try:
            if _empty(cells[attr]) and attr in ("time", "event"):
                other = "event" if attr == "time" else "time"
                raise ValueError(f"{attr} is empty while {other} is not")
            values[attr] = None if _empty(cells[attr]) else parse(cells[attr])
        except ValueError as err:
            problems.append(
                _Problem(
                    f"outcomes-{attr}", f"{where}, {names[attr]}", str(err), _FIX[attr]
                )
            )
            return None
    got = Outcome(**{_FIELD.get(a, a): v for a, v in values.items()})
    out[case] = got
    return got


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value: object, what: str) -> float:
    """A finite decimal number (``ValueError`` naming ``what`` otherwise)."""
    text = str(value).strip()
    if isinstance(value, bool) or not _NUMBER.fullmatch(text):
        if text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise ValueError(f"{what} {text[:24]!r} is not finite")
        raise ValueError(f"{what} {text[:24]!r} is not a number")
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{what} {text[:24]!r} is not finite")
    return number


def _days(value: object) -> float:
    days = _number(value, "time")
    if days < 0:
        raise ValueError(f"time {days:g} is negative")
    if days == 0:
        raise ValueError(
            "time 0: a patient followed for no time tells nothing (for an event "
            "on the day of surgery write 1)"
        )
    if days > MAX_DAYS:
        raise ValueError(f"time {days:g} days is more than 100 years (a date?)")
    return days


def _event(value: object) -> int:
    text = str(value).strip().lower()
    if isinstance(value, bool) or text not in EVENTS:
        raise ValueError(
            f"event {str(value).strip()[:24]!r} is not 1 or 0 (nor dead, deceased, "
            "censored, alive)"
        )
    return EVENTS[text]


def _size(value: object) -> float:
    size = _number(value, "size")
    if not 0 <= size <= MAX_SIZE_CM:
        raise ValueError(f"size {size:g} cm is not in 0..{MAX_SIZE_CM:g} cm")
    return size


_PARSERS: dict[str, Any] = {"time": _days, "event": _event, "size": _size}
_PARSERS["age"] = lambda v: normalise("age", str(v))
_PARSERS["sex"] = lambda v: normalise("sex", str(v))
_FIELD = {"age": "age_band", "size": "size_cm"}  # attribute -> Outcome field
