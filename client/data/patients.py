"""One patient, one unit: the rules that keep DP-SGD's guarantee per patient.

DP-SGD bounds how much one *sample* of the training set can move the model, and
Poisson sampling draws samples. The guarantee is about patients only when each
sample is one patient: a patient listed twice (two rows, two copies of one scan,
one patient id on two cases) has twice the influence the accounting allows,
and a patient in both training and validation makes the validation metrics
describe training data. Segmentation takes one case per patient; classification
groups a patient's slices into one sample
(:mod:`client.tasks.classification.data`). Both refuse,
before any training, what would break that, and ``kidneyfl site check`` reports
the same problems as errors.

Nothing here leaves the site: messages name local files and case ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from client.data.errors import SiteDataError

REPEATED_CASE = "repeated-case"
IDENTICAL_IMAGES = "identical-images"
REPEATED_PATIENT = "repeated-patient"
TRAIN_AND_VALIDATION = "patient-in-train-and-validation"
KINDS = (REPEATED_CASE, IDENTICAL_IMAGES, REPEATED_PATIENT, TRAIN_AND_VALIDATION)
FIX = (
    "remove the duplicates from the data (or give each patient one id in the "
    "manifest's patient column), or list the cases to leave out under "
    "data.exclude_cases in the site YAML"
)


@dataclass(frozen=True)
class Unit:
    """What the rules need of one case: its id, patient, image and split."""

    case_id: str
    patient: str  # the case id when the layout names no patient
    image: Path
    digest: str  # of the image's content; "" when unreadable
    split: str  # "train" or "validation"


@dataclass(frozen=True)
class PatientProblem:
    """Cases that break one-patient-one-unit, with a sentence saying how."""

    kind: str
    cases: tuple[str, ...]
    files: tuple[str, ...]
    message: str

    def describe(self) -> str:
        """The problem with its cases and files, for local logs and errors."""
        files = ", ".join(self.files)
        return f"{self.message}: cases {', '.join(self.cases)} ({files})"


def patient_problems(
    units: list[Unit], one_case_per_patient: bool
) -> list[PatientProblem]:
    """Every way ``units`` break the rule that a patient is one unit.

    Parameters
    ----------
    units : list of Unit
        The site's training and validation cases.
    one_case_per_patient : bool
        Segmentation (True): a patient may have one case only. Classification
        (False): a patient may have several slices, which must all carry the
        patient's id and share a split.

    Returns
    -------
    list of PatientProblem
        Repeated image files, identical images of different cases (segmentation)
        or of different patient ids (classification), repeated patient ids
        (segmentation), and patients in both training and validation.
    """
    problems = []
    by_path: dict[Path, list[Unit]] = {}
    for u in units:
        by_path.setdefault(u.image.resolve(), []).append(u)
    for group in by_path.values():
        if len(group) > 1:
            problems.append(
                _problem(
                    REPEATED_CASE, group, "one image file is listed more than once"
                )
            )
    by_digest: dict[str, list[Unit]] = {}
    for u in units:
        if u.digest:
            by_digest.setdefault(u.digest, []).append(u)
    for group in by_digest.values():
        paths = {u.image.resolve() for u in group}
        patients = {u.patient for u in group}
        if len(paths) > 1 and (one_case_per_patient or len(patients) > 1):
            problems.append(
                _problem(
                    IDENTICAL_IMAGES,
                    group,
                    "these files hold identical images, so the same patient",
                )
            )
    by_patient: dict[str, list[Unit]] = {}
    for u in units:
        by_patient.setdefault(u.patient, []).append(u)
    for patient, group in sorted(by_patient.items()):
        if len({u.split for u in group}) > 1:
            problems.append(
                _problem(
                    TRAIN_AND_VALIDATION,
                    group,
                    f"patient {patient} is in both training and validation",
                )
            )
        if (
            one_case_per_patient
            and len(group) > 1
            and len({u.image.resolve() for u in group}) > 1
        ):
            problems.append(
                _problem(
                    REPEATED_PATIENT,
                    group,
                    f"patient {patient} has {len(group)} cases; one case per "
                    "patient is the unit of privacy",
                )
            )
    return problems


def refuse(problems: list[PatientProblem], site: str) -> None:
    """Raise one error naming every problem, or return if there is none.

    Raises
    ------
    SiteDataError
        Naming the cases, files and the fix (site-local text).
    """
    if problems:
        listed = "; ".join(p.describe() for p in problems)
        raise SiteDataError(
            f"site {site}: the patient is the unit of privacy, and {listed}. Fix: {FIX}"
        )


def _problem(kind: str, group: list[Unit], message: str) -> PatientProblem:
    group = sorted(group, key=lambda u: u.case_id)
    return PatientProblem(
        kind,
        tuple(u.case_id for u in group),
        tuple(str(u.image) for u in group),
        message,
    )


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes ("" when unreadable): identical files are the
    same patient."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
