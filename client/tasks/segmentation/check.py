"""The readiness check's part for segmentation volumes.

Every listed case is inspected (:mod:`client.data.case_check`: readable, 3D,
Hounsfield range, spacing, label grid and values against the layout's label
map) and its intensities are compared with the site's ``data.modality`` (a
CT-looking scan at an MR site, or the reverse, is an error naming the file);
regions are counted per case and in voxels; the usable cases are split as
training would split them and the patient rules are applied.
"""

from __future__ import annotations

from client.data.case_check import FATAL, declared_findings
from client.data.check_report import MIN_CASES, DataCheck
from client.data.layouts import Case, Discovered, discover
from client.data.split import leave_out
from client.tasks.segmentation.cases import inspect, split_cases, split_problems
from common.config import SiteConfig
from common.metrics import LABELS


def check_cases(site: SiteConfig, report: DataCheck) -> None:
    """Fill ``report`` with the site's cases and problems.

    Raises
    ------
    SiteDataError
        When the layout cannot be read at all (a setup error).
    """
    d = site.data
    found = discover(d.root, d.layout, d.label_names, d.manifest)
    report.layout = found.layout
    report.notes = list(found.notes)
    report.cases_found = len(found.cases)
    left_out: dict[str, str] = {}
    kept = leave_out(found.cases, d.exclude_cases, left_out)
    report.cases_excluded = sorted(left_out)
    usable = _inspect_all(kept, found, report, d.modality)
    report.cases_usable = len(usable)
    if len(usable) < MIN_CASES:
        return
    train, val = split_cases(usable, site, found.splits)
    report.count_patients(train, val)
    for side, group in (("train", train), ("validation", val)):
        for case in group:
            for name in _regions(case, found, None):
                report.count_class(name, split=side)
    labels = frozenset(found.label_map)
    report.add_patient_problems(split_problems(train, val, labels))


def _inspect_all(
    cases: list[Case], found: Discovered, report: DataCheck, modality: str
) -> list:
    """The usable labelled cases; every finding of every case, for a site of
    ``modality``, into ``report``."""
    usable = []
    for case in cases:
        if case.label is None:
            report.cases_unlabelled.append(case.case_id)
        result = inspect(case, frozenset(found.label_map))
        findings = declared_findings(result, case.image, modality)
        report.findings.extend(findings)
        if any(f.severity == FATAL for f in findings):
            report.cases_with_errors.append(case.case_id)
        elif case.label is not None:
            usable.append(case)
            for name, n in _regions(case, found, result.label_voxels).items():
                report.count_class(name, n)
    return usable


def _regions(
    case: Case, found: Discovered, voxels: dict[int, int] | None
) -> dict[str, int]:
    """kidneyfl region name -> voxels of a case's label (from its inspection)."""
    if voxels is None:
        voxels = inspect(case, frozenset(found.label_map)).label_voxels
    out: dict[str, int] = {}
    for value, n in voxels.items():
        name = LABELS.get(found.label_map.get(value, -1), str(value))
        out[name] = out.get(name, 0) + n
    return out
