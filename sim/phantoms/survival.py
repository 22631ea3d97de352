"""Outcomes for phantom sites, drawn from a known hazard (issue 30).

:func:`write_outcomes` gives every case of a KiTS-style phantom folder a
follow-up time and a vital status, written as the challenge's clinical data,
``kits.json``, so that the prognosis task has something to learn whose answer
is known. The hazard is proportional, on a Weibull baseline::

    h(t | x) = (k / lam) (t / lam)^(k - 1) exp(lp),  k = 0.9, lam = 2500 days

    lp = 0.4 ln(tumour mL / 50) + 1.0 (grade - 2) + 0.2 (age - 65) / 10

and ``lp = -3.0`` for a patient without a tumour (a rare event). Why:

- **tumour volume** (label 2 voxels times the affine's voxel volume) is the
  prognostic sign everyone reads off a scan; its log spreads the phantoms'
  10-540 mL evenly. ``radiographic_size`` (the tumour's largest bounding-box
  side, cm) reports it, so a covariate model reaches part of the risk;
- **grade** (ISUP 1-4) is the part only the image carries. In ``kits.json``
  ``tumor_isup_grade`` is pathology's, known after surgery: a prognosis model
  that took it as a covariate would be handed most of the answer. It comes
  from the tumour's hypo-enhancement, mean image value in label 2 minus mean
  in label 1 (the kidney, read from the same scan, so a scanner's calibration
  offset cancels), less 100 HU per unit of necrotic share (tumour voxels more
  than 90 HU below the kidney's mean: the phantoms' 20-35 HU core, whatever
  the offset, where a fixed 50 HU would count a whole tumour of the -25 HU
  scanner as necrotic), plus a per-case jitter of sd 6 HU so that grade is not
  a function of intensity alone. Thresholds, fixed for every CT site and
  chosen on the three demo sites (about 20/35/30/15 % of tumours from grade 1
  to 4): above -25 HU grade 1, above -40 grade 2, above -55 grade 3, else 4.
  The contrast phase moves a site's mix (a corticomedullary site has more low
  grades): sites differ, as hospitals do. Grade's coefficient is the larger
  one so that the image matters: on the demo sites (means over outcome
  seeds) tumour volume alone ranks with C 0.68-0.76 against the oracle's
  0.80-0.83, the room an image model has above a size covariate;
- **age** adds mildly (the phantoms' ages are 50, 65 or 75, from
  ``subgroups.csv``; 45-80 drawn without it);
- **Weibull, k < 1**: after nephrectomy the hazard of dying of kidney cancer is
  highest early. Censoring is administrative at 1825 days (five years, the
  last of the plan's survival edges) and, before that, at a constant 0.2 a
  year, which stands for loss to follow-up and for staggered accrual (a
  patient operated late in the accrual window reaches the data cut-off early).
  Over a 200-case site with 90 % tumours about 35-55 % die within follow-up
  and the median follow-up, by reverse Kaplan-Meier (censoring as the event,
  the usual definition), is 2-4 years (ln 2 / 0.2 = 3.5 years); the median
  observed time, deaths included, is shorter, about 1.5 years.

Times are the Weibull model's inverse CDF, ``lam (-ln U / exp(lp))^(1/k)``,
rounded up to whole days. Every draw of a case (grade jitter, age and sex when
``subgroups.csv`` lacks them, event time, loss time) comes from
``numpy.random.default_rng`` seeded with ``seed``, a SHA-256 digest of the
folder's name and one of the case's name: the same folder and seed give the
same bytes, and a CT case's outcome does not depend on which other cases
exist (a skipped case moves no one else's).

**MR and other non-HU images.** The thresholds above are HU for the CT
phantoms. A case is HU-like unless its ``imaging.json`` sidecar says MR or its
image has no air (nothing below -500). For the others the score is the
tumour's relative departure from the kidney, ``-|tumour mean / kidney mean -
1|`` (a T2 necrotic core is bright, so it already moves the mean), jittered by
0.45 of the score's spread over those cases, and cut at that site's own
quantiles into the same 20/35/30/15 % of grades 1-4.

**The answer key.** ``survival-truth.json`` holds the generator's version, its
parameters, each case's true ``lp``, ``grade``, ``tumour_ml``, ``time`` and
``event``, and ``oracle_c_harrell``: Harrell's C of the true lp over all cases,
the best concordance any model can reach on these data, up to sampling (a model
that knew the hazard exactly would still rank only this well, because the
times are random). :func:`oracle_c_index` gives it for any subset, such as a
site's validation split. The file is read by benchmarks and tests only, never
by a site's training code: it is the answer, not data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from sksurv.metrics import concordance_index_censored
from sksurv.nonparametric import kaplan_meier_estimator

from client.data.subgroups import KITS_JSON, SUBGROUPS_CSV
from common.atomic import atomic_write_text
from sim.phantoms.profiles import IMAGE_NAME, SEGMENTATION_NAME, SIDECAR_NAME

logger = logging.getLogger(__name__)

GENERATOR = "kidneyfl.sim.phantoms.survival"
GENERATOR_VERSION = 1  # bump when the hazard, the draws or the files change
TRUTH_JSON = "survival-truth.json"
KIDNEY, TUMOUR = 1, 2
# Grade shares 1-4 for the quantile fallback, as the CT thresholds give on the
# demo sites.
GRADE_SHARES = (0.20, 0.35, 0.30, 0.15)
_UNREADABLE = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


@dataclass(frozen=True)
class Hazard:
    """The generator's parameters, written into the answer key."""

    log_volume_coef: float = 0.4  # per ln(mL)
    reference_ml: float = 50.0
    grade_coef: float = 1.0  # per ISUP step
    reference_grade: int = 2
    age_coef: float = 0.2  # per decade
    reference_age: float = 65.0
    no_tumour_lp: float = -3.0
    weibull_shape: float = 0.9
    weibull_scale_days: float = 2500.0
    follow_up_days: int = 1825  # administrative censoring
    loss_per_year: float = 0.2  # hazard of censoring before 1825 days
    grade_cuts_hu: tuple[float, float, float] = (-25.0, -40.0, -55.0)
    necrosis_weight_hu: float = 100.0  # per unit of necrotic share
    necrosis_below_kidney_hu: float = 90.0
    grade_jitter_hu: float = 6.0
    fallback_jitter_sd: float = 0.45  # of the score's spread, non-HU images


HAZARD = Hazard()


@dataclass(frozen=True)
class _Scan:
    """What the hazard reads from one case's image and segmentation."""

    case_id: str
    tumour_ml: float
    size_cm: float
    score: float  # hypo-enhancement score; more negative = higher grade
    hu_like: bool


def _key(text: str) -> int:
    # Python's hash() is salted per process; a digest keeps runs reproducible.
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _is_mr(case: Path) -> bool:
    try:
        side = json.loads((case / SIDECAR_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(side, dict) and str(side.get("Modality", "")).upper() == "MR"


def _read_scan(case: Path, hz: Hazard) -> _Scan:
    img_nii = nib.load(str(case / IMAGE_NAME))
    seg_nii = nib.load(str(case / SEGMENTATION_NAME))
    image = np.asarray(img_nii.dataobj, dtype=np.float32)
    label = np.rint(np.asarray(seg_nii.dataobj)).astype(np.int16)
    if image.shape != label.shape:
        raise ValueError(f"image {image.shape} and segmentation {label.shape} differ")
    tumour = label == TUMOUR
    hu_like = not _is_mr(case) and float(image.min()) < -500.0
    if not tumour.any():
        return _Scan(case.name, 0.0, 0.0, math.nan, hu_like)
    axes = seg_nii.affine[:3, :3]
    idx = np.argwhere(tumour)
    extent_mm = (np.ptp(idx, axis=0) + 1) * np.linalg.norm(axes, axis=0)
    tumour_ml = float(tumour.sum()) * abs(float(np.linalg.det(axes))) / 1000.0
    values = image[tumour].astype(np.float64)
    kidney = image[label == KIDNEY].astype(np.float64)
    k_mean = float(kidney.mean()) if kidney.size else math.nan
    if hu_like:
        necrotic = float((values < k_mean - hz.necrosis_below_kidney_hu).mean())
        score = float(values.mean()) - k_mean - hz.necrosis_weight_hu * necrotic
    else:
        score = -abs(float(values.mean()) / k_mean - 1.0)
    if not math.isfinite(score):
        raise ValueError("no kidney voxels (label 1) to compare the tumour with")
    return _Scan(case.name, tumour_ml, float(extent_mm.max()) / 10.0, score, hu_like)


def _subgroups(root: Path) -> dict[str, dict[str, str]]:
    try:
        text = (root / SUBGROUPS_CSV).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return {}
    rows = csv.DictReader(text.splitlines())
    return {r["case"].strip(): r for r in rows if r.get("case")}


def _age(row: dict[str, str], drawn: int) -> int:
    try:
        years = float(row.get("age") or "")
    except ValueError:
        return drawn  # an age band or blank: no number to keep
    return int(round(years)) if 0 <= years <= 120 else drawn


def _gender(row: dict[str, str], drawn: str) -> str:
    sex = (row.get("sex") or "").strip().lower()
    return {"f": "female", "female": "female", "m": "male", "male": "male"}.get(
        sex, drawn
    )


def _grades(scans: list[_Scan], jitter: dict[str, float], hz: Hazard) -> dict[str, int]:
    """ISUP grade per tumour case: fixed HU cuts, or the site's quantiles."""
    grades: dict[str, int] = {}
    other = [s for s in scans if s.tumour_ml > 0 and not s.hu_like]
    for s in scans:
        if s.tumour_ml > 0 and s.hu_like:
            jittered = s.score + hz.grade_jitter_hu * jitter[s.case_id]
            grades[s.case_id] = 1 + sum(bool(jittered <= c) for c in hz.grade_cuts_hu)
    if other:
        raw = np.array([s.score for s in other])
        spread = float(raw.std()) or 1.0
        jittered = raw + hz.fallback_jitter_sd * spread * np.array(
            [jitter[s.case_id] for s in other]
        )
        cum = np.cumsum(GRADE_SHARES)[:-1]
        cuts = np.quantile(jittered, 1.0 - cum)  # highest score is grade 1
        for s, v in zip(other, jittered, strict=True):
            grades[s.case_id] = 1 + int(sum(v <= c for c in cuts))
    return grades


def _linear_predictor(
    tumour_ml: float, grade: int | None, age: int, hz: Hazard
) -> float:
    if tumour_ml <= 0 or grade is None:
        return hz.no_tumour_lp
    return (
        hz.log_volume_coef * math.log(tumour_ml / hz.reference_ml)
        + hz.grade_coef * (grade - hz.reference_grade)
        + hz.age_coef * (age - hz.reference_age) / 10.0
    )


def _outcome(lp: float, u_event: float, u_loss: float, hz: Hazard) -> tuple[int, bool]:
    t_event = hz.weibull_scale_days * (-math.log(u_event) / math.exp(lp)) ** (
        1.0 / hz.weibull_shape
    )
    t_loss = -math.log(u_loss) * 365.25 / hz.loss_per_year
    t_censor = min(t_loss, float(hz.follow_up_days))
    event = t_event <= t_censor
    days = math.ceil(min(t_event, t_censor))
    return min(max(days, 1), hz.follow_up_days), bool(event)


def harrell_c(lp: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C of risk ``lp`` (higher = earlier death) against outcomes.

    Raises
    ------
    ValueError
        No comparable pair (e.g. no event among the cases).
    """
    return float(
        concordance_index_censored(
            np.asarray(event, bool), np.asarray(time, float), np.asarray(lp, float)
        )[0]
    )


def _median_follow_up(time: np.ndarray, event: np.ndarray) -> float:
    """Reverse Kaplan-Meier median (censoring is the 'event'), days."""
    t, surv = kaplan_meier_estimator(~event.astype(bool), time.astype(float))
    below = np.flatnonzero(surv <= 0.5)
    return float(t[below[0]]) if below.size else float(time.max())


def write_outcomes(root: Path, seed: int = 0) -> Path:
    """Write ``root/kits.json`` and the answer key ``root/survival-truth.json``.

    Parameters
    ----------
    root : Path
        A KiTS-style site folder (``case_*/imaging.nii.gz`` and
        ``segmentation.nii.gz``), with ``subgroups.csv`` for ages and sexes
        when present. A case whose files cannot be read is skipped (warning).
    seed : int
        Outcome seed, mixed with the folder's and each case's name.

    Returns
    -------
    Path
        The ``kits.json`` written (atomically; byte-identical on a rerun).

    Raises
    ------
    FileNotFoundError
        ``root`` holds no readable case.
    """
    root, hz = Path(root), HAZARD
    scans: list[_Scan] = []
    for case in sorted(p for p in root.glob("case_*") if p.is_dir()):
        try:
            scans.append(_read_scan(case, hz))
        except _UNREADABLE as exc:
            logger.warning("%s: skipped, its scan cannot be used (%s)", case.name, exc)
    if not scans:
        raise FileNotFoundError(f"{root}: no readable case_* folder")
    groups = _subgroups(root)
    site_key = _key(root.resolve().name)
    draws = {}
    for s in scans:
        rng = np.random.default_rng([seed, site_key, _key(s.case_id)])
        # Always the same draws in the same order, whatever subgroups.csv says.
        jitter, age = rng.standard_normal(), int(rng.integers(45, 81))
        sex = "female" if rng.random() < 0.5 else "male"
        draws[s.case_id] = (jitter, age, sex, 1.0 - rng.random(), 1.0 - rng.random())
    grades = _grades(scans, {c: d[0] for c, d in draws.items()}, hz)
    clinical, truth_cases = [], {}
    for s in scans:
        _, drawn_age, drawn_sex, u_event, u_loss = draws[s.case_id]
        row = groups.get(s.case_id, {})
        age, grade = _age(row, drawn_age), grades.get(s.case_id)
        lp = _linear_predictor(s.tumour_ml, grade, age, hz)
        days, event = _outcome(lp, u_event, u_loss, hz)
        clinical.append(
            {
                "case_id": s.case_id,
                "age_at_nephrectomy": age,
                "gender": _gender(row, drawn_sex),
                "vital_status": "dead" if event else "censored",
                "vital_days_after_surgery": days,
                "radiographic_size": round(s.size_cm, 1),
                "tumor_isup_grade": grade,
                "malignant": s.tumour_ml > 0,
            }
        )
        truth_cases[s.case_id] = {
            "lp": round(lp, 6),
            "grade": grade,
            "tumour_ml": round(s.tumour_ml, 3),
            "time": days,
            "event": event,
        }
    lp = np.array([c["lp"] for c in truth_cases.values()])
    time = np.array([c["time"] for c in truth_cases.values()])
    event = np.array([c["event"] for c in truth_cases.values()])
    truth = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "parameters": asdict(hz),
        "n_cases": len(scans),
        "event_share": round(float(event.mean()), 4),
        "median_time_days": float(np.median(time)),
        "median_follow_up_days": _median_follow_up(time, event),
        "oracle_c_harrell": round(harrell_c(lp, time, event), 6)
        if event.any()
        else None,
        "cases": truth_cases,
    }
    out = root / KITS_JSON
    atomic_write_text(root / TRUTH_JSON, json.dumps(truth, indent=2) + "\n")
    atomic_write_text(out, json.dumps(clinical, indent=2) + "\n")
    logger.info(
        "%s: outcomes for %d cases, %.0f %% events, oracle C %s",
        root.name,
        len(scans),
        100 * truth["event_share"],
        truth["oracle_c_harrell"],
    )
    return out


def oracle_c_index(truth: dict[str, Any], case_ids: list[str]) -> float:
    """Harrell's C of the true lp over ``case_ids`` (e.g. a validation split).

    Parameters
    ----------
    truth : dict
        The parsed ``survival-truth.json``.
    case_ids : list of str
        Cases to score; each must be in the answer key.

    Raises
    ------
    KeyError
        A case the answer key does not hold.
    ValueError
        No comparable pair among these cases (e.g. no event).
    """
    cases = truth["cases"]
    missing = [c for c in case_ids if c not in cases]
    if missing:
        raise KeyError(f"not in the answer key: {', '.join(missing[:5])}")
    rows = [cases[c] for c in case_ids]
    return harrell_c(
        np.array([r["lp"] for r in rows]),
        np.array([r["time"] for r in rows]),
        np.array([r["event"] for r in rows]),
    )
