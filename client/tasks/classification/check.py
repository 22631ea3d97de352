"""The readiness check's part for classification slices.

What it checks: the manifest or class folders parse; every labelled image
loads as a 2D slice or 3D volume with finite values (an ERROR naming the file
otherwise: training skips it); classes the default plan does not name are a
WARNING (the check has no plan: a class the federation's plan does not list
fails at training); the split by patient (``data.exclude_cases``, the split
column, ``data.train_cases`` / ``data.validation_cases``,
``data.validation_fraction``) with the patient rules of
:mod:`client.data.patients`; cases per class, overall and per split. HU
ranges and spacing are not checked for slices.
"""

from __future__ import annotations

from pathlib import Path

from client.data.case_check import FATAL, WARN, Finding
from client.data.check_report import MIN_CASES, DataCheck
from client.data.class_layouts import (
    ClsCase,
    class_layout,
    class_names_of,
    discover_classes,
    manifest_path,
)
from client.data.split import leave_out
from client.tasks.classification.data import slice_problem, split_patients
from common.config import Plan, SiteConfig

UNREADABLE_FIX = "replace the file or list it under data.exclude_cases"


def check_cases(site: SiteConfig, report: DataCheck) -> None:
    """Fill ``report`` with the site's classification cases and problems.

    Raises
    ------
    SiteDataError
        When the manifest or folders cannot be read at all (a setup error).
    """
    d = site.data
    cases = discover_classes(site, None)
    report.layout = class_layout(site)
    report.cases_found = len(cases)
    left_out: dict[str, str] = {}
    kept = leave_out(cases, d.exclude_cases, left_out)
    report.cases_excluded = sorted(left_out)
    names = class_names_of(site)
    _unknown_classes(site, names, report)
    readable = _readable(kept, names, report)
    report.cases_usable = len(readable)
    if len(readable) < MIN_CASES:
        return
    train, val, problems = split_patients(readable, site)
    report.count_patients(train, val)
    for side, group in (("train", train), ("validation", val)):
        for c in group:
            report.count_class(names[c.label or 0], split=side)
    report.add_patient_problems(problems)


def _readable(cases: list[ClsCase], names: tuple[str, ...], report: DataCheck) -> list:
    """The labelled, readable, not-test cases; an ERROR per unreadable image."""
    plan = Plan.model_validate({"task": "classification"})
    readable = []
    for case in cases:
        if case.label is None:
            report.cases_unlabelled.append(case.case_id)
        if problem := slice_problem(case.image, plan):
            report.findings.append(
                Finding("unreadable", FATAL, str(case.image), problem, UNREADABLE_FIX)
            )
            report.cases_with_errors.append(case.case_id)
        elif case.label is not None and case.split != "test":
            readable.append(case)
            report.count_class(names[case.label])
    return readable


def _unknown_classes(
    site: SiteConfig, names: tuple[str, ...], report: DataCheck
) -> None:
    known = Plan.model_fields["class_names"].default
    for name in names:
        if name not in known:
            report.findings.append(
                Finding(
                    "unknown-class",
                    WARN,
                    str(_where(site)),
                    f"class {name!r} is not among the default plan's class-names "
                    f"({', '.join(known)}); training refuses it unless the "
                    "federation's plan lists it",
                    "correct the label (or folder name), or ask the coordinator "
                    "to add the class to the plan's class-names",
                )
            )


def _where(site: SiteConfig) -> Path:
    return manifest_path(site) if class_layout(site) == "manifest" else site.data.root
