"""How unlike its training data a scan is, and what the model was trained on.

**Provenance.** The final model's sidecar says what the run trained on
(:data:`TRAINING_DATA_KEY`). A model trained on synthetic phantoms only has
never seen a patient; every prediction and every export says so
(:data:`SYNTHETIC_ONLY_WARNING`). Sidecars written before the key existed say
nothing, and nothing is claimed for them either way.

**Out-of-distribution score.** The hard checks of ``client/scan_check.py``
refuse what is plainly not an abdominal CT. Between "plainly wrong" and "like
the training data" lies a continuum: a contrast phase, a field of view or a
patient size the sites never had. Each scan is reduced to a few numbers
(:data:`FEATURES`: log voxel spacing and log field of view per RAS axis, the
5th/50th/95th HU percentiles of the body, log(1 + mL) of the predicted kidney
with its masses and of the predicted tumour), and its score is the
root-mean-square z-score of those numbers against the pooled training
distribution::

    score = sqrt(mean_f ((x_f - mean_f) / std_f) ** 2)

0 at the pooled mean; about 1 for a typical training scan. Each ``std_f`` is
floored at :data:`STD_FLOOR` (a spacing 10% off, 20 HU, ...): phantoms hold
some features constant, and a zero spread would put every real scan infinitely
far away.

**Why this threshold.** A raw score has no meaning until one knows how often
scans of the training population exceed it. Scores of the training scans
themselves are optimistic (the model and the reference were fitted on them),
so each site scores its *held-out validation* patients and releases only the
share above each threshold of the fixed grid :data:`THRESHOLDS`
(:func:`exceedance`); the coordinator pools the shares of all sites, weighted
by their patient counts, and takes the smallest threshold whose pooled share
(the false-alarm rate on scans like the training data) is at most the target
(:func:`choose_threshold`). Sites release aggregates only: per-feature sums
and sums of squares (:func:`feature_sums`) and per-threshold shares; no
patient's features leave a site. Everything a site sends is checked here
(lengths, finite values, counts) before it is pooled, and refused with a
``ValueError`` naming the problem: one hostile or broken site must not make
the reference non-finite for everyone.

numpy only: the coordinator imports this without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

# -- sidecar keys and provenance ------------------------------------------------
TRAINING_DATA_KEY = "training-data"  # {"synthetic-only", "sites", "pretrained-on"}
OOD_REFERENCE_KEY = "ood-reference"  # pooled_reference + choose_threshold
SYNTHETIC_ONLY_WARNING = "trained on synthetic phantoms only: not for real scans"

# -- the score --------------------------------------------------------------------
# Axes in RAS order: x left-right, y posterior-anterior, z inferior-superior.
FEATURES: tuple[str, ...] = (
    "log-spacing-x",
    "log-spacing-y",
    "log-spacing-z",
    "log-fov-x",
    "log-fov-y",
    "log-fov-z",
    "body-hu-p5",
    "body-hu-p50",
    "body-hu-p95",
    "log1p-kidney-masses-ml",
    "log1p-tumour-ml",
)
# The smallest spread credited to each feature: log units (0.1 is about 10%),
# HU, log(1 + mL). A scan this far from a constant phantom feature is 1 SD off.
STD_FLOOR: tuple[float, ...] = (
    0.1,
    0.1,
    0.1,
    0.1,
    0.1,
    0.1,
    20.0,
    20.0,
    20.0,
    0.2,
    0.5,
)
BODY_HU = -500.0  # above air and lung: the body
EMPTY_BODY_HU = -1000.0  # the percentiles of a scan without a body voxel
MIN_REFERENCE_PATIENTS = 2
MAX_PATIENTS = 10**9  # per site: anything larger is a hostile or broken count
THRESHOLDS: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
DEFAULT_TARGET = 0.05
_N = len(FEATURES)
_RTOL = 1e-9  # rounding slack when checking sums against sums of squares


def synthetic_only(meta: Mapping[str, Any]) -> bool | None:
    """Whether a sidecar says its model was trained on synthetic data only.

    Parameters
    ----------
    meta : Mapping
        The checkpoint sidecar.

    Returns
    -------
    bool or None
        True when ``training-data`` says ``"synthetic-only": true``, or names
        every site (and the pretraining, if any) ``"synthetic"`` (the
        cautious reading of a contradiction); False when it says
        ``"synthetic-only": false`` or names a ``"real"`` source; None when
        it says neither, or the sidecar has no readable ``training-data``
        (older models: provenance unknown).
    """
    data = meta.get(TRAINING_DATA_KEY)
    if not isinstance(data, Mapping):
        return None
    flag = data.get("synthetic-only")
    sites = data.get("sites")
    sources = list(sites.values()) if isinstance(sites, Mapping) else []
    pre = data.get("pretrained-on")
    if flag is True:
        return True
    if (
        sources
        and all(v == "synthetic" for v in sources)
        and pre in (None, "synthetic")
    ):
        return True
    if flag is False or "real" in sources or pre == "real":
        return False
    return None


def model_warnings(meta: Mapping[str, Any]) -> list[str]:
    """Warnings every use of this model must carry (empty when none)."""
    return [SYNTHETIC_ONLY_WARNING] if synthetic_only(meta) else []


# -- features ---------------------------------------------------------------------
def image_features(data_hu: np.ndarray, zooms: Sequence[float]) -> np.ndarray:
    """The features that depend on the image alone (the first nine).

    Parameters
    ----------
    data_hu : numpy.ndarray
        The scan in HU, its first three axes in RAS order (any flips).
    zooms : sequence of float
        Voxel spacing in mm along those axes.
    """
    data = np.asarray(data_hu)
    spacing = np.asarray(list(zooms)[:3], dtype=float)
    if data.ndim < 3 or spacing.size != 3:
        raise ValueError(f"need a 3-D scan and 3 spacings, got {data.shape}, {zooms}")
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"voxel spacing must be positive and finite, got {zooms}")
    fov = spacing * np.asarray(data.shape[:3], dtype=float)
    finite = data[np.isfinite(data)]
    body = finite[finite > BODY_HU]
    if body.size:
        pct = np.percentile(body, (5, 50, 95))
    else:  # no body at all (refused unless forced): as far off as air is
        pct = np.full(3, EMPTY_BODY_HU)
    return np.concatenate([np.log(spacing), np.log(fov), pct]).astype(float)


def volume_features(volumes_ml: Mapping[str, float]) -> np.ndarray:
    """The features of the predicted volumes (the last two).

    ``volumes_ml`` as ``predict`` reports them: ``kidney`` (label 1 only),
    ``tumour`` and ``cyst`` in mL.
    """
    try:
        vol = {k: float(volumes_ml[k]) for k in ("kidney", "tumour", "cyst")}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"volumes-ml needs kidney, tumour, cyst in mL ({exc})"
        ) from None
    if not all(math.isfinite(v) and v >= 0 for v in vol.values()):
        raise ValueError(f"volumes must be finite and non-negative, got {vol}")
    total = vol["kidney"] + vol["tumour"] + vol["cyst"]
    return np.log1p(np.asarray([total, vol["tumour"]]))


def scan_features(
    data_hu: np.ndarray, zooms: Sequence[float], volumes_ml: Mapping[str, float]
) -> np.ndarray:
    """All :data:`FEATURES` of one scan, in that order.

    Parameters
    ----------
    data_hu : numpy.ndarray
        The scan in HU, axes in RAS order (``client.scan_check.ras_view``).
    zooms : sequence of float
        Voxel spacing in mm along the same axes.
    volumes_ml : Mapping
        Predicted ``kidney``, ``tumour``, ``cyst`` in mL.

    Returns
    -------
    numpy.ndarray
        Shape ``(len(FEATURES),)``.
    """
    return np.concatenate([image_features(data_hu, zooms), volume_features(volumes_ml)])


# -- checking what others send ------------------------------------------------------
def _vector(value: Any, what: str, n: int = _N) -> np.ndarray:
    try:
        arr = np.asarray(value) if not isinstance(value, str | bytes) else None
    except (TypeError, ValueError, OverflowError):  # ragged, or unconvertible
        arr = None
    if arr is None or arr.dtype.kind not in "iuf" or arr.shape != (n,):
        raise ValueError(f"{what}: need {n} numbers, got {value!r:.80}")
    arr = arr.astype(float)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: non-finite value in {arr.tolist()}")
    return arr


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{what}: need a whole number, got {value!r:.40}")
    if value < 0:
        raise ValueError(f"{what}: negative count {value}")
    if value > MAX_PATIENTS:
        raise ValueError(f"{what}: {value} patients is not a plausible count")
    return int(value)


def _fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{what}: need a number, got {value!r:.40}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{what}: need a value in [0, 1], got {value}")
    return float(value)


def _site_sums(sums: Any, what: str) -> tuple[int, np.ndarray, np.ndarray]:
    if not isinstance(sums, Mapping):
        raise ValueError(f"{what}: need a mapping with n, sum, sumsq")
    missing = {"n", "sum", "sumsq"} - set(sums)
    if missing:
        raise ValueError(f"{what}: missing {sorted(missing)}")
    n = _count(sums["n"], f"{what} n")
    s = _vector(sums["sum"], f"{what} sum")
    q = _vector(sums["sumsq"], f"{what} sumsq")
    if np.any(q < 0):
        raise ValueError(f"{what}: negative sum of squares")
    if n == 0 and (np.any(s != 0) or np.any(q != 0)):
        raise ValueError(f"{what}: sums over 0 patients must be 0")
    with np.errstate(over="ignore", invalid="ignore"):
        # Cauchy-Schwarz: n * sum(x^2) >= (sum x)^2, or the variance is negative
        consistent = q * n >= s * s * (1 - _RTOL) - _RTOL
    if not np.all(consistent):
        raise ValueError(f"{what}: sums of squares smaller than the sums allow")
    return n, s, q


def check_reference(reference: Mapping[str, Any]) -> dict[str, Any]:
    """A reference (pooled, and possibly calibrated) checked and as plain lists.

    Raises
    ------
    ValueError
        If its features are not :data:`FEATURES`, or means, spreads or the
        threshold are missing or not finite and positive.
    """
    if not isinstance(reference, Mapping):
        raise ValueError("ood reference: need a mapping")
    if list(reference.get("features", [])) != list(FEATURES):
        raise ValueError(
            f"ood reference: features {reference.get('features')!r:.200} are not "
            f"this version's {list(FEATURES)}"
        )
    mean = _vector(reference.get("mean"), "ood reference mean")
    std = _vector(reference.get("std"), "ood reference std")
    if np.any(std <= 0):
        raise ValueError("ood reference std: need positive spreads")
    out = dict(reference)
    out.update(features=list(FEATURES), mean=mean.tolist(), std=std.tolist())
    if "threshold" in reference:
        t = reference["threshold"]
        if isinstance(t, bool) or not isinstance(t, Real) or not (0 < t < math.inf):
            raise ValueError(
                f"ood reference threshold: need a positive number, got {t}"
            )
        out["threshold"] = float(t)
    return out


# -- site side ----------------------------------------------------------------------
def feature_sums(rows: Sequence[np.ndarray]) -> dict[str, Any]:
    """Per-feature count, sum and sum of squares over a site's patients.

    Parameters
    ----------
    rows : sequence of numpy.ndarray
        One :func:`scan_features` vector per patient.

    Returns
    -------
    dict
        ``{"n": int, "sum": [float], "sumsq": [float]}``: the released aggregate.
    """
    arr = np.zeros((0, _N))
    if len(rows):
        arr = np.stack([_vector(r, f"feature row {i}") for i, r in enumerate(rows)])
    return {
        "n": int(arr.shape[0]),
        "sum": arr.sum(axis=0).tolist(),
        "sumsq": (arr * arr).sum(axis=0).tolist(),
    }


def exceedance(scores: Sequence[float]) -> list[float]:
    """Share of a site's validation scans scoring above each of :data:`THRESHOLDS`.

    Raises
    ------
    ValueError
        If there are no scores, or one is negative or not finite.
    """
    arr = np.asarray(list(scores), dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("exceedance: need at least one validation score")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"exceedance: scores must be finite and >= 0, got {arr}")
    return [float((arr > t).mean()) for t in THRESHOLDS]


# -- coordinator side -----------------------------------------------------------------
def pooled_reference(
    site_sums: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The training distribution of the features, pooled over all sites.

    Parameters
    ----------
    site_sums : sequence of Mapping, or Mapping of site name to it
        Each site's :func:`feature_sums`.

    Returns
    -------
    dict
        ``{"features": [...], "mean": [...], "std": [...], "patients": int}``;
        ``std`` is the sample standard deviation (ddof 1) floored at
        :data:`STD_FLOOR`.

    Raises
    ------
    ValueError
        If a site's sums are malformed, or fewer than
        :data:`MIN_REFERENCE_PATIENTS` patients are pooled.
    """
    items = (
        site_sums.items() if isinstance(site_sums, Mapping) else enumerate(site_sums)
    )
    total_n, total_s, total_q = 0, np.zeros(_N), np.zeros(_N)
    for key, sums in items:
        n, s, q = _site_sums(sums, f"site {key}")
        total_n, total_s, total_q = total_n + n, total_s + s, total_q + q
    if total_n < MIN_REFERENCE_PATIENTS:
        raise ValueError(
            f"ood reference: {total_n} patients pooled; need at least "
            f"{MIN_REFERENCE_PATIENTS}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        mean = total_s / total_n
        var = np.maximum(total_q - total_n * mean * mean, 0.0) / (total_n - 1)
        std = np.maximum(np.sqrt(var), np.asarray(STD_FLOOR))
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise ValueError("ood reference: the pooled sums overflow (values too large)")
    return {
        "features": list(FEATURES),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "patients": total_n,
    }


def choose_threshold(
    site_shares: Mapping[str, Sequence[float]],
    site_counts: Mapping[str, int],
    target: float = DEFAULT_TARGET,
) -> dict[str, Any]:
    """The smallest threshold whose pooled validation false-alarm rate is at
    most ``target`` (else the largest of :data:`THRESHOLDS`).

    Parameters
    ----------
    site_shares : Mapping
        Site name -> its :func:`exceedance` (one share per threshold).
    site_counts : Mapping
        Site name -> its number of validation patients (the weights).
    target : float
        The acceptable share of training-like scans flagged.

    Returns
    -------
    dict
        ``{"threshold", "false-alarm-rate", "calibrated-on", "target"}``.

    Raises
    ------
    ValueError
        If the sites of the two mappings differ, a share list has the wrong
        length, a share is outside [0, 1] or grows with the threshold, a count
        is negative, or no patient is counted.
    """
    target = _fraction(target, "target")
    if set(site_shares) != set(site_counts):
        raise ValueError(
            f"sites with shares {sorted(site_shares)} differ from sites with "
            f"counts {sorted(site_counts)}"
        )
    total, pooled = 0, np.zeros(len(THRESHOLDS))
    for site in site_shares:
        n = _count(site_counts[site], f"site {site} validation count")
        shares = _vector(site_shares[site], f"site {site} shares", len(THRESHOLDS))
        if np.any((shares < 0) | (shares > 1)):
            raise ValueError(f"site {site} shares: need values in [0, 1]: {shares}")
        if np.any(np.diff(shares) > _RTOL):
            raise ValueError(f"site {site} shares grow with the threshold: {shares}")
        total, pooled = total + n, pooled + n * shares
    if total == 0:
        raise ValueError("choose_threshold: no validation patients counted")
    pooled = pooled / total
    ok = np.flatnonzero(pooled <= target + _RTOL)
    i = int(ok[0]) if ok.size else len(THRESHOLDS) - 1
    return {
        "threshold": THRESHOLDS[i],
        "false-alarm-rate": float(pooled[i]),
        "calibrated-on": total,
        "target": target,
    }


def sidecar_reference(
    reference: Mapping[str, Any], calibration: Mapping[str, Any]
) -> dict[str, Any]:
    """The sidecar's :data:`OOD_REFERENCE_KEY` value: reference and threshold."""
    return check_reference({**reference, **calibration})


# -- scoring ----------------------------------------------------------------------
def feature_z(features: np.ndarray, reference: Mapping[str, Any]) -> np.ndarray:
    """Signed z-score of each feature against ``reference``."""
    ref = check_reference(reference)
    x = _vector(features, "scan features")
    return (x - np.asarray(ref["mean"])) / np.asarray(ref["std"])


def ood_score(features: np.ndarray, reference: Mapping[str, Any]) -> float:
    """Root-mean-square z-score of a scan's features (0 at the pooled mean)."""
    z = feature_z(features, reference)
    return float(np.sqrt(np.mean(z * z)))


def furthest(
    features: np.ndarray, reference: Mapping[str, Any], k: int = 3
) -> dict[str, float]:
    """The ``k`` features furthest from the reference: name -> signed z."""
    z = feature_z(features, reference)
    order = np.argsort(-np.abs(z), kind="stable")[:k]
    return {FEATURES[i]: float(z[i]) for i in order}
