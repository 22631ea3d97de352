"""The data part of ``kidneyfl site check``: what a task's ``check`` hook fills.

Each task checks its own cases (:meth:`client.tasks.base.Task.check`) into a
:class:`DataCheck`; :mod:`client.readiness` adds the environment and the
verdict. Its content names local files and case ids and never leaves the site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from client.data.case_check import FATAL, Finding
from client.data.patients import FIX as PATIENT_FIX
from client.data.patients import TRAIN_AND_VALIDATION, PatientProblem

MIN_CASES = 2  # training refuses a site with fewer usable labelled cases


@dataclass
class DataCheck:
    """What a site's data look like to training, case by case."""

    layout: str = ""
    notes: list[str] = field(default_factory=list)
    cases_found: int = 0
    cases_usable: int = 0  # labelled, readable, not left out: what training uses
    cases_unlabelled: list[str] = field(default_factory=list)
    cases_with_errors: list[str] = field(default_factory=list)
    cases_excluded: list[str] = field(default_factory=list)  # data.exclude_cases
    train_patients: int = 0
    validation_patients: int = 0
    class_cases: dict[str, int] = field(default_factory=dict)
    class_voxels: dict[str, int] = field(default_factory=dict)
    # split ("train", "validation") -> class or region -> cases
    class_cases_by_split: dict[str, dict[str, int]] = field(default_factory=dict)
    duplicates: list[list[str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def count_class(
        self, name: str, voxels: int | None = None, split: str | None = None
    ) -> None:
        """One more usable case of class (or region) ``name``, in the split
        ``split`` when given, else overall."""
        counts = self.class_cases
        if split is not None:
            counts = self.class_cases_by_split.setdefault(split, {})
        counts[name] = counts.get(name, 0) + 1
        if voxels is not None:
            self.class_voxels[name] = self.class_voxels.get(name, 0) + voxels

    def add_patient_problems(self, problems: list[PatientProblem]) -> None:
        """Each problem as an ERROR naming its files (training refuses them)."""
        for p in problems:
            self.findings.append(
                Finding(
                    p.kind,
                    FATAL,
                    ", ".join(p.files),
                    f"{p.message} (cases {', '.join(p.cases)})",
                    PATIENT_FIX,
                )
            )
            if p.kind != TRAIN_AND_VALIDATION:
                self.duplicates.append(list(p.cases))

    def count_patients(self, train: list, validation: list) -> None:
        """Patients per side of the split (items with a ``patient_id``)."""
        self.train_patients = len({c.patient_id for c in train})
        self.validation_patients = len({c.patient_id for c in validation})
