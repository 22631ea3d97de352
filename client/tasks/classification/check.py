"""The readiness check's part for classification slices.

What it checks: the manifest or class folders parse (any class name: the check
has no plan, so a class the plan does not list shows only at training); every
labelled image loads as a 2D slice or 3D volume with finite values; the split
by patient (``data.exclude_cases``, the split column, ``data.train_cases`` /
``data.validation_cases``, ``data.validation_fraction``) and the patient rules
of :mod:`client.data.patients`. HU ranges and spacing are not checked for slices.
"""

from __future__ import annotations

import csv
from typing import TYPE_CHECKING

from client.data.case_check import FATAL, Finding
from client.tasks.classification.data import (
    MANIFEST,
    class_names_of,
    discover,
    load_slice,
)
from client.tasks.classification.split import split_patients
from client.tasks.segmentation.data import SiteDataError
from common.config import Plan, SiteConfig

if TYPE_CHECKING:
    from client.readiness import SiteCheck


def is_classification(site: SiteConfig) -> bool:
    """Whether the site's data are classification slices: class folders, a
    classification phantom, or a manifest whose labels are not image files."""
    d = site.data
    if d.layout == "class-folders" or (
        site.phantom and site.phantom.task != "segmentation"
    ):
        return True
    manifest = d.manifest or d.root / MANIFEST
    if d.layout not in ("auto", "manifest") or not manifest.is_file():
        return False
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return False  # the segmentation reader names the problem
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "label" not in header:
        return False
    i = header.index("label")
    labels = [r[i].strip().lower() for r in rows[1:] if len(r) > i and r[i].strip()]
    return bool(labels) and not any(v.endswith((".nii", ".nii.gz")) for v in labels)


def check_classification_cases(site: SiteConfig, report: SiteCheck) -> None:
    """Fill ``report`` with the site's classification cases and problems.

    Raises
    ------
    SiteDataError
        When the manifest or folders cannot be read at all (a setup error).
    """
    from client.readiness import MIN_CASES, add_patient_problems
    from client.tasks.segmentation.data import leave_out

    d = site.data
    cases = discover(site, None)
    report.layout = d.layout if d.layout != "auto" else "classification"
    report.cases_found = len(cases)
    left_out: dict[str, str] = {}
    kept = leave_out(cases, d.exclude_cases, left_out)
    report.cases_excluded = sorted(left_out)
    plan = Plan.model_validate({"task": "classification"})
    names = class_names_of(site)
    readable = []
    for case in kept:
        if case.label is None:
            report.cases_unlabelled.append(case.case_id)
        try:
            load_slice(case.image, plan)
        except SiteDataError as exc:
            report.findings.append(
                Finding(
                    "unreadable",
                    FATAL,
                    str(case.image),
                    str(exc),
                    "replace the file or list it under data.exclude_cases",
                )
            )
            report.cases_with_errors.append(case.case_id)
            continue
        if case.label is not None and case.split != "test":
            readable.append(case)
            key = names[case.label]
            report.class_cases[key] = report.class_cases.get(key, 0) + 1
    report.cases_usable = len(readable)
    if len(readable) < MIN_CASES:
        return
    train, val, problems = split_patients(readable, site)
    report.train_patients = len({c.patient_id for c in train})
    report.validation_patients = len({c.patient_id for c in val})
    add_patient_problems(report, problems)
