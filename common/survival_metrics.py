"""Discrimination and calibration of a prognosis model on one validation set,
with scikit-survival, from the curves and risk scores of :mod:`common.survival`.

Why scikit-survival for the metrics: it is the maintained reference
implementation of Harrell's and Uno's C, the cumulative/dynamic AUC and the
IPCW Brier score, on numpy. lifelines has no Uno C or time-dependent AUC;
torchsurv is lighter but younger; pycox pulls numba and is barely maintained.
It is imported inside :func:`survival_metrics` only: the coordinator never
needs it (it draws Kaplan-Meier curves from counts with
:func:`common.survival.km_from_counts`).

Metric keys (:func:`survival_metrics`; names in ``common.wire``; the
life-table counts by risk group come from :func:`common.survival.km_counts`):

- ``cases-outcome``, ``cases-event``: validation patients and their events.
- ``c-harrell``: Harrell's concordance of the risk score, on all validation
  patients.
- ``c-uno``: Uno's IPCW concordance, truncated at the last edge.
- ``td-auc-<h>``: cumulative/dynamic AUC at horizon ``h`` days of the
  predicted probability of an event by ``h``.
- ``ibs``: integrated Brier score of the predicted curves over the edges
  inside the validation follow-up.
- ``cal-pred-<H>``, ``cal-obs-<H>``: mean predicted survival and the
  Kaplan-Meier survival of the validation patients at the last horizon ``H``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from common import wire
from common.survival import _check_edges, survival_at

log = logging.getLogger("kidneyfl.survival")


def _finite(fn: Callable[[], Any]) -> float | None:
    """``fn()`` as a float, or None where sksurv finds it undefined."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            value = float(fn())
    except (ValueError, ZeroDivisionError, FloatingPointError) as err:
        log.debug("survival metric left out: %s", err)
        return None
    return value if math.isfinite(value) else None


def _day_key(prefix: str, days: float) -> str:
    return f"{prefix}{round(days)}"


def survival_metrics(
    train_time: np.ndarray,
    train_event: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    curve: np.ndarray,
    risk: np.ndarray,
    edges: Sequence[float],
    horizons: Sequence[float],
) -> dict[str, float]:
    """Discrimination and calibration of one validation set.

    Parameters
    ----------
    train_time, train_event : ndarray, shape (M,)
        The site's training outcomes; they estimate the censoring distribution
        for Uno's C, the td-AUC and the Brier score, and never leave the site.
    time, event : ndarray, shape (N,)
        Validation follow-up in days and event indicator (0/1).
    curve : ndarray, shape (N, K)
        Predicted survival at the edges (:func:`common.survival.survival_curve`).
    risk : ndarray, shape (N,)
        Risk scores, higher is worse (:func:`common.survival.risk_score`).
    edges : sequence of float
        The plan's interval edges in days.
    horizons : sequence of float
        Days for the td-AUC; calibration is at the last one.

    Returns
    -------
    dict
        ``cases-outcome`` and ``cases-event`` always; the other keys of the
        module docstring only where defined for these data (with fewer than
        two patients or no event, only the counts). Values are finite floats.

    Notes
    -----
    sksurv's inverse-probability-of-censoring weights come from a Kaplan-Meier
    estimate of censoring on the training outcomes, defined only up to the
    largest training time ``c``. For Uno's C, the td-AUC and the Brier score
    the validation follow-up is therefore censored at ``c`` (an event at or
    after ``c`` becomes censored at ``c``); Harrell's C and the calibration use
    the validation outcomes as given. Uno's C is truncated at the last edge
    (pairs whose earlier time is at or past it are left out). The td-AUC
    marker at ``h`` is the predicted probability of an event by ``h``,
    ``1 - S(h)`` from the curve: hazards need not be proportional, so the
    ranking may change with ``h``.
    """
    edges = _check_edges(edges)
    time = np.asarray(time, float).ravel()
    event = np.asarray(event).ravel().astype(bool)
    n = time.size
    out: dict[str, float] = {
        wire.CASES_OUTCOME: float(n),
        wire.CASES_EVENT: float(event.sum()),
    }
    if n < 2 or not event.any():
        return out
    from sksurv.metrics import (
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )

    curve = np.asarray(curve, float).reshape(n, len(edges))
    risk = np.asarray(risk, float).ravel()

    def add(key: str, fn: Callable[[], Any]) -> None:
        value = _finite(fn)
        if value is not None:
            out[key] = value

    add(wire.C_HARRELL, lambda: concordance_index_censored(event, time, risk)[0])

    train_time = np.asarray(train_time, float).ravel()
    train_event = np.asarray(train_event).ravel().astype(bool)
    if train_time.size:
        cut = float(train_time.max())
        train_y = _surv(train_event, train_time)
        val_y = _surv(event & (time < cut), np.minimum(time, cut))
        add(
            wire.C_UNO,
            lambda: concordance_index_ipcw(train_y, val_y, risk, tau=edges[-1])[0],
        )
        for h in horizons:
            marker = 1.0 - survival_at(curve, edges, h)
            add(
                _day_key(wire.TD_AUC_PREFIX, h),
                lambda m=marker, h=h: cumulative_dynamic_auc(train_y, val_y, m, [h])[1],
            )
        followed = np.minimum(time, cut)
        inside = [
            k for k, e in enumerate(edges) if followed.min() <= e < followed.max()
        ]
        if len(inside) >= 2:
            add(
                wire.IBS,
                lambda: integrated_brier_score(
                    train_y, val_y, curve[:, inside], [edges[k] for k in inside]
                ),
            )

    if len(horizons):
        last = float(horizons[-1])
        observed = _finite(lambda: _km_at(time, event, last))
        if observed is not None:
            predicted = float(survival_at(curve, edges, last).mean())
            out[_day_key(wire.CAL_PRED_PREFIX, last)] = predicted
            out[_day_key(wire.CAL_OBS_PREFIX, last)] = observed
    return out


def _surv(event: np.ndarray, time: np.ndarray) -> np.ndarray:
    """sksurv's structured outcome array; sksurv validates it where used."""
    out = np.empty(time.size, dtype=[("event", bool), ("time", float)])
    out["event"], out["time"] = event, time
    return out


def _km_at(time: np.ndarray, event: np.ndarray, t: float) -> float:
    """Kaplan-Meier survival at ``t``; ValueError past the follow-up it covers."""
    from sksurv.nonparametric import kaplan_meier_estimator

    times, surv = kaplan_meier_estimator(event, time)
    if t > times[-1] and surv[-1] > 0:
        raise ValueError(f"Kaplan-Meier is undefined past {times[-1]} days")
    k = int(np.searchsorted(times, t, side="right")) - 1
    return 1.0 if k < 0 else float(surv[k])
