"""Classification data split by patient: a patient's slices stay together.

The split decides which patients train and which validate; a patient in both,
or one image under two patients, is reported (:mod:`client.data.patients`) so that
training can refuse and the readiness check can name it.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from client.data.patients import PatientProblem, Unit, patient_problems
from client.tasks.classification.data import ClsCase
from client.tasks.segmentation.data import SiteDataError, leave_out
from common.config import SiteConfig


def split_patients(
    cases: list[ClsCase], site: SiteConfig
) -> tuple[list[ClsCase], list[ClsCase], list[PatientProblem]]:
    """Train and validation cases, split by patient, and what breaks the rule
    that a patient is one unit.

    ``data.exclude_cases`` (image names or patient ids) are left out. The
    manifest's split column wins; then ``data.train_cases`` /
    ``data.validation_cases`` (image names without extension); a patient with
    one of its images assigned goes where that image goes. The other patients
    are split per class (a patient's class: the most common of its slices) by
    ``data.validation_fraction`` with ``data.split_seed``, so every class with
    two or more patients has one in validation.

    Raises
    ------
    SiteDataError
        No labelled training image, or ``data.exclude_cases`` names an unknown id.
    """
    d = site.data
    kept = leave_out(cases, d.exclude_cases, {})
    labelled = [c for c in kept if c.label is not None and c.split != "test"]
    by_patient: dict[str, list[ClsCase]] = {}
    for c in labelled:
        by_patient.setdefault(c.patient_id, []).append(c)
    train, val, rest = [], [], []
    for group in by_patient.values():
        named = {_named_split(c, site) for c in group} - {None}
        if len(named) > 1:  # refused below, with the patient named
            train += [c for c in group if _named_split(c, site) != "validation"]
            val += [c for c in group if _named_split(c, site) == "validation"]
        elif named:
            (val if named == {"validation"} else train).extend(group)
        else:
            rest.append(group)
    rng = random.Random(d.split_seed)
    for label in sorted({_patient_class(g) for g in rest}):
        group = sorted(
            (g for g in rest if _patient_class(g) == label),
            key=lambda g: g[0].patient_id,
        )
        rng.shuffle(group)
        k = round(len(group) * d.validation_fraction)
        if d.validation_fraction > 0 and len(group) >= 2:
            k = min(max(k, 1), len(group) - 1)
        val += [c for g in group[:k] for c in g]
        train += [c for g in group[k:] for c in g]
    if not train:
        raise SiteDataError(
            f"{site.source}: no labelled training images; label some cases or "
            "lower data.validation_fraction"
        )
    units = [
        Unit(c.case_id, c.patient_id, c.image, file_digest(c.image), split)
        for split, group in (("train", train), ("validation", val))
        for c in group
    ]
    return train, val, patient_problems(units, one_case_per_patient=False)


def _named_split(c: ClsCase, site: SiteConfig) -> str | None:
    d = site.data
    if c.split in ("train", "validation"):
        return c.split
    if d.train_cases and c.case_id in d.train_cases:
        return "train"
    if d.validation_cases and c.case_id in d.validation_cases:
        return "validation"
    return None


def _patient_class(group: list[ClsCase]) -> int:
    labels = [int(c.label or 0) for c in group]
    return max(sorted(set(labels)), key=labels.count)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (identical images are the same patient)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
