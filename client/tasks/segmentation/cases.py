"""A segmentation site's cases: discovered, inspected, split by patient.

Whatever the layout, discovery ends in the same list of
:class:`client.data.layouts.Case`, so training never knows how a hospital
stores its files. Unreadable cases are skipped with their reason (site-local
logs only); each case must be a distinct patient (:mod:`client.data.patients`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from client.data.case_check import (
    CaseReport,
    Finding,
    declared_findings,
    inspect_case,
)
from client.data.errors import SiteDataError
from client.data.label_map import remap_labels
from client.data.layouts import Case, discover
from client.data.patients import PatientProblem, Unit, patient_problems, refuse
from client.data.split import leave_out, split_by_patient
from common.atomic import atomic_write_json
from common.config import SiteConfig

log = logging.getLogger(__name__)

KITS_VALUES = frozenset({0, 1, 2, 3})


@dataclass(frozen=True)
class SiteCases:
    """A site's usable cases, split, plus what was skipped and why (local only)."""

    train: list[Case]
    validation: list[Case]
    skipped: dict[str, str]
    label_map: dict[int, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Stable digest of the training set (ids and file sizes), for the ledger."""
        h = hashlib.sha256()
        for c in sorted(self.train, key=lambda c: c.case_id):
            h.update(c.case_id.encode())
            h.update(str(c.image.stat().st_size).encode())
        return h.hexdigest()[:16]


_INSPECTED: dict[str, CaseReport] = {}
_USED: list[set[str]] = []  # the keys each open kept_inspections block used

# A site's inspections, kept across processes in its state_dir: a deployed
# site forks a fresh process per message, and the simulation's report reads a
# site's cases once more at the end; each would otherwise read every scan again.
INSPECTED_FILE = "inspected-cases.json"
_INSPECTED_VERSION = 1


def _file_key(path: Path) -> list | None:
    try:
        st = path.stat()
    except OSError:
        return None
    # ctime too: a file replaced under the same size and mtime (cp -p) has a
    # new ctime, which no one can set back
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _key(case: Case, label_values: frozenset[int]) -> str | None:
    files = [case.image] + ([case.label] if case.label is not None else [])
    keys = [_file_key(p) for p in files]
    if any(k is None for k in keys):
        return None  # a missing file: found again at once, never kept
    return json.dumps([sorted(label_values), keys])


def inspect(case: Case, label_values: frozenset[int] = KITS_VALUES) -> CaseReport:
    """:func:`client.data.case_check.inspect_case`, memoised per file version
    (path, size, modification and change times), so a long-lived process (a
    simulation actor) reads each case once, and, inside
    :func:`kept_inspections`, so does every later process of the site."""
    key = _key(case, label_values)
    if key is None:
        return inspect_case(case.image, case.label, label_values)
    if key not in _INSPECTED:
        _INSPECTED[key] = inspect_case(case.image, case.label, label_values)
    for used in _USED:
        used.add(key)
    return _INSPECTED[key]


def _report_from_json(d: dict) -> CaseReport:
    looks = d["looks_like"]
    if looks is not None and not isinstance(looks, str):
        raise TypeError("looks_like")
    return CaseReport(
        findings=[
            Finding(**{k: str(f[k]) for k in _FINDING_FIELDS}) for f in d["findings"]
        ],
        label_voxels={int(k): int(v) for k, v in d["label_voxels"].items()},
        spacing=tuple(float(z) for z in d["spacing"]),
        axcodes=str(d["axcodes"]),
        image_digest=str(d["image_digest"]),
        looks_like=looks,
    )


_FINDING_FIELDS = ("kind", "severity", "file", "message", "fix")


def _read_inspections(path: Path) -> dict[str, CaseReport]:
    """The kept reports; any entry (or file) that does not read back as one is
    left out, and its case is inspected again."""
    try:
        doc = json.loads(path.read_text())
        reports = doc["reports"] if doc.get("version") == _INSPECTED_VERSION else {}
        items = list(reports.items())
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}
    out = {}
    for key, d in items:
        try:
            out[str(key)] = _report_from_json(d)
        except (TypeError, ValueError, KeyError, AttributeError):
            continue
    return out


@contextlib.contextmanager
def kept_inspections(state_dir: str | Path) -> Iterator[None]:
    """Inspections kept in ``<state_dir>/inspected-cases.json`` for the block:
    read before it, and afterwards the reports of the cases it inspected
    written back (only those: a removed case's entry goes with it).

    The key is each file's path, size, and modification and change times, so a
    file that changed in any way is inspected again. The file holds what
    ``kidneyfl site check`` shows about each case (findings with local paths,
    label voxel counts, a voxel digest) and stays in the site's state_dir,
    like its data cache; it is written only where the state_dir exists.
    """
    path = Path(state_dir) / INSPECTED_FILE
    kept = _read_inspections(path)
    for key, report in kept.items():
        _INSPECTED.setdefault(key, report)
    used: set[str] = set()
    _USED.append(used)
    try:
        yield
    finally:
        _USED.remove(used)
    if used == set(kept) or not path.parent.is_dir():
        return
    reports = {
        k: dataclasses.asdict(_INSPECTED[k]) for k in sorted(used) if k in _INSPECTED
    }
    try:
        atomic_write_json(path, {"version": _INSPECTED_VERSION, "reports": reports})
    except OSError as exc:  # a read-only state_dir: inspect again next time
        log.debug("could not keep the case inspections in %s: %s", path, exc)


def load_site_cases(site: SiteConfig) -> SiteCases:
    """Discover (any supported layout), validate and split a site's cases.

    Cases listed in ``data.exclude_cases`` are left out; unreadable cases are
    logged by path and skipped; unlabelled cases are kept for prediction only.
    The split is :mod:`client.data.split`'s.

    Raises
    ------
    SiteDataError
        If no labelled case is usable, or too few to split; if a patient is
        listed twice (repeated file, identical images, repeated patient id) or
        is in both training and validation.
    """
    with kept_inspections(site.state_dir):
        return _load_site_cases(site)


def _load_site_cases(site: SiteConfig) -> SiteCases:
    d = site.data
    found = discover(d.root, d.layout, d.label_names, d.manifest)
    skipped: dict[str, str] = {}
    labels = frozenset(found.label_map)
    usable = []
    for case in leave_out(found.cases, d.exclude_cases, skipped):
        if (problem := _problem(case, labels, site.data.modality)) is None:
            usable.append(case)
        else:
            skipped[case.case_id] = problem
    if len(usable) < 2:
        raise SiteDataError(
            f"site {site.name}: {len(usable)} usable labelled case(s) under "
            f"{d.root} ({len(found.cases)} found, {len(skipped)} skipped); at least "
            "2 are needed. Run `kidneyfl site check` for the list of problems"
        )
    train, val = split_cases(usable, site, found.splits)
    refuse(split_problems(train, val, labels), site.name)
    return SiteCases(train, val, skipped, found.label_map)


def _problem(case: Case, labels: frozenset[int], modality: str = "CT") -> str | None:
    """Why a case cannot train (None: it can): the same findings as ``kidneyfl
    site check`` for the site's ``data.modality`` (an MR site's scans are not
    held to the CT range; a scan of the other modality is an error)."""
    if case.label is None:
        return "no segmentation (prediction only)"
    findings = declared_findings(inspect(case, labels), case.image, modality)
    errors = [f for f in findings if f.severity == "error"]
    if not errors:
        return None
    first = errors[0]
    problem = f"{first.file}: {first.message}; {first.fix}"
    log.warning("skipping case %s: %s", case.case_id, problem)
    return problem


def split_cases(
    cases: list[Case], site: SiteConfig, splits: dict[str, str] | None = None
) -> tuple[list[Case], list[Case]]:
    """Training and validation cases by :func:`client.data.split.split_by_patient`
    (``splits``: the manifest's split column by case id; one stratum)."""
    column = splits or {}
    return split_by_patient(cases, site, lambda c: column.get(c.case_id, ""))


def split_problems(
    train: list[Case], validation: list[Case], label_values: frozenset[int]
) -> list[PatientProblem]:
    """What breaks one-case-per-patient in a split (:mod:`client.data.patients`);
    the images' digests come from the (memoised) inspection."""
    units = [
        Unit(c.case_id, c.patient_id, c.image, inspect(c, label_values).image_digest, s)
        for s, group in (("train", train), ("validation", validation))
        for c in group
    ]
    return patient_problems(units, one_case_per_patient=True)


def raw_volumes(
    cases: list[Case], label_map: dict[int, int] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    """``(image HU, label, spacing)`` per case in RAS axis order, labels in
    kidneyfl's values, for the dataset fingerprint (aggregated at the site)."""
    for case in cases:
        img = nib.as_closest_canonical(nib.load(str(case.image)))
        lab = nib.as_closest_canonical(nib.load(str(case.label)))
        raw = np.asanyarray(lab.dataobj)
        yield (
            np.asanyarray(img.dataobj, dtype=np.float32),
            remap_labels(raw, label_map) if label_map else raw,
            tuple(float(z) for z in img.header.get_zooms()[:3]),
        )
