"""Discrete-time survival for the prognosis task: loss, curves and metrics.

Time is cut at the plan's interval edges (days), a strictly increasing tuple
``e_0 < ... < e_{K-1}`` of right edges: interval ``k`` is ``[e_{k-1}, e_k)``
with ``e_{-1} = 0``. The model gives one logit per interval, the hazard
``h_k = sigmoid(logit_k)``: the probability of the event in interval ``k`` given
survival to its start. Survival at an edge is ``S(e_k) = prod_{j<=k} (1 - h_j)``.
Follow-up at or beyond the last edge is censored there (administrative
censoring): the model says nothing past ``e_{K-1}``.

Why the logistic-hazard loss (Gensheimer & Narasimhan 2019, "Nnet-survival";
pycox's ``LogisticHazard``): its likelihood is a product over patients, each
factor depending on that patient's scan and outcome only, so the batch loss is
a mean of per-patient terms and DP-SGD's per-sample gradient clipping bounds
each patient's influence as the privacy analysis assumes. The Cox partial
likelihood does not factor this way: each event's term is normalised over its
risk set, so one patient's gradient depends on every other patient in the
batch, and clipping per sample no longer bounds a patient's contribution.

Why scikit-survival for the metrics: it is the maintained reference
implementation of Harrell's and Uno's C, the cumulative/dynamic AUC and the
IPCW Brier score, on numpy. lifelines has no Uno C or time-dependent AUC;
torchsurv is lighter but younger; pycox pulls numba and is barely maintained.
It is imported inside :func:`survival_metrics` only: the coordinator never
needs it (it draws Kaplan-Meier curves from counts with :func:`km_from_counts`).

Metric keys (:func:`survival_metrics`, :func:`km_counts`; names in
``common.wire``):

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
- ``cases-atrisk-<group>-<k>``, ``km-events-<group>-<k>``: life-table counts
  per predicted risk group, summed across sites by the coordinator.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from common import wire

log = logging.getLogger("kidneyfl.survival")

RISK_GROUPS: tuple[str, ...] = tuple(wire.RISK_GROUPS)

ArrayOrTensor = TypeVar("ArrayOrTensor", torch.Tensor, np.ndarray)


def _check_edges(edges: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(e) for e in edges)
    if not out:
        raise ValueError("interval edges are empty: give at least one edge in days")
    if not all(math.isfinite(e) and e > 0 for e in out):
        raise ValueError(f"interval edges {out} must be finite and positive days")
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"interval edges {out} must be strictly increasing")
    return out


def interval_index(time: ArrayOrTensor, edges: Sequence[float]) -> ArrayOrTensor:
    """The interval containing each time.

    Parameters
    ----------
    time : Tensor or ndarray
        Follow-up times in days.
    edges : sequence of float
        Right edges of the K intervals, strictly increasing.

    Returns
    -------
    Tensor or ndarray
        int64 indices in ``0..K-1``, of the same type as ``time``; times at or
        beyond the last edge fall in the last interval.
    """
    edges = _check_edges(edges)
    last = len(edges) - 1
    if isinstance(time, torch.Tensor):
        t = time if time.is_floating_point() else time.double()
        cuts = torch.tensor(edges, dtype=t.dtype, device=t.device)
        idx = torch.searchsorted(cuts, t.contiguous(), right=True)
        return idx.clamp(max=last).to(torch.int64)
    idx = np.searchsorted(np.asarray(edges), np.asarray(time, float), side="right")
    return np.minimum(idx, last).astype(np.int64)


class LogisticHazardLoss(torch.nn.Module):
    """Negative log-likelihood of the discrete-time logistic hazard model
    (Gensheimer & Narasimhan 2019, "Nnet-survival"; pycox's LogisticHazard),
    mean over the batch of per-patient terms.

    A patient with interval ``j`` and event ``e`` contributes
    ``-[sum_{k<j} log(1-h_k) + e log h_j + (1-e) log(1-h_j)]``. A patient
    censored inside interval ``j`` counts as surviving it only if the censoring
    time is at least the interval's midpoint (Nnet-survival's convention; the
    first half contributes nothing for interval ``j``): half an interval of
    follow-up is the best guess of having lived through it. A time at or beyond
    the last edge is censored there: event forced to 0, all K intervals
    survived.

    Each patient's term depends on that patient only, so the batch loss is a
    plain mean of per-patient terms, the form Opacus assumes with
    ``loss_reduction="mean"``, and DP-SGD's per-sample clipping is valid
    (unlike the Cox partial likelihood, whose risk sets couple patients).

    Parameters
    ----------
    edges : sequence of float
        Right edges of the K intervals in days, strictly increasing.
    """

    midpoints: torch.Tensor
    edges: torch.Tensor

    def __init__(self, edges: Sequence[float]) -> None:
        super().__init__()
        cuts = _check_edges(edges)
        starts = (0.0, *cuts[:-1])
        mids = tuple((a + b) / 2 for a, b in zip(starts, cuts, strict=True))
        # Not persistent: the loss's constants must not end up in a state dict.
        self.register_buffer("edges", torch.tensor(cuts), persistent=False)
        self.register_buffer("midpoints", torch.tensor(mids), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of a batch.

        Parameters
        ----------
        logits : Tensor, shape (B, K)
            Hazard logits per interval.
        target : Tensor, shape (B, 2)
            ``[:, 0]`` follow-up time in days, ``[:, 1]`` event (0 or 1).

        Returns
        -------
        Tensor
            Scalar loss; zero (still attached to ``logits``) for an empty batch.
        """
        k = self.edges.numel()
        if logits.ndim != 2 or logits.shape[1] != k:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match the "
                f"{k} intervals of the plan's edges"
            )
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        time = target[:, 0].to(logits.dtype)
        edges = self.edges.to(logits.dtype)
        beyond = time >= edges[-1]
        event = (target[:, 1] > 0.5) & ~beyond
        idx = torch.searchsorted(edges, time.contiguous(), right=True).clamp(max=k - 1)
        here = torch.arange(k, device=logits.device)[None, :] == idx[:, None]
        before = torch.arange(k, device=logits.device)[None, :] < idx[:, None]
        lived_half = time >= self.midpoints.to(logits.dtype)[idx]
        counted = before | (here & (event | lived_half)[:, None])
        labels = (here & event[:, None]).to(logits.dtype)
        # The logits form of the Bernoulli likelihood stays finite for any logit.
        nll = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return (nll * counted.to(logits.dtype)).sum(dim=1).mean()


def survival_curve(logits: torch.Tensor) -> torch.Tensor:
    """Predicted survival at each edge, ``S(e_k) = prod_{j<=k} (1 - h_j)``.

    Parameters
    ----------
    logits : Tensor, shape (B, K)

    Returns
    -------
    Tensor, shape (B, K)
        Non-increasing in ``k``, within [0, 1].
    """
    # log(1 - sigmoid(x)) = -softplus(x): no 1 - h rounding to 0 for large x.
    return torch.exp(-torch.cumsum(F.softplus(logits), dim=1))


def risk_score(logits: torch.Tensor) -> torch.Tensor:
    """Risk score, higher is worse: the cumulative hazard at the last edge,
    ``sum_k -log(1 - h_k)``; it orders patients as ``1 - S(e_{K-1})`` does.

    Parameters
    ----------
    logits : Tensor, shape (B, K)

    Returns
    -------
    Tensor, shape (B,)
    """
    return F.softplus(logits).sum(dim=1)


def survival_at(curve: np.ndarray, edges: Sequence[float], t: float) -> np.ndarray:
    """Step-function survival at time ``t`` from survival at the edges.

    Parameters
    ----------
    curve : ndarray, shape (N, K)
        Predicted survival at the edges.
    edges : sequence of float
    t : float
        Time in days.

    Returns
    -------
    ndarray, shape (N,)
        1.0 before the first edge; the value at the last edge at or before
        ``t`` otherwise (held beyond the last edge).
    """
    edges = _check_edges(edges)
    curve = np.asarray(curve, float).reshape(-1, len(edges))
    k = int(np.searchsorted(np.asarray(edges), float(t), side="right")) - 1
    if k < 0:
        return np.ones(curve.shape[0])
    return curve[:, min(k, len(edges) - 1)].copy()


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
        Predicted survival at the edges (:func:`survival_curve`).
    risk : ndarray, shape (N,)
        Risk scores, higher is worse (:func:`risk_score`).
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


def km_counts(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, edges: Sequence[float]
) -> dict[str, int]:
    """Life-table counts per predicted risk group and interval.

    Patients are split at the site's median risk: ``high`` above it, ``low``
    at or below it (ties and sites with fewer than two patients all ``low``).

    Parameters
    ----------
    time, event, risk : ndarray, shape (N,)
        Validation follow-up in days, event (0/1) and risk score.
    edges : sequence of float

    Returns
    -------
    dict
        For each group ``g`` and interval ``k``: ``cases-atrisk-<g>-<k>``, the
        patients followed to at least the interval's start, and
        ``km-events-<g>-<k>``, the events inside the interval (events at or
        beyond the last edge are in none). Every key is present, as int.
    """
    edges = _check_edges(edges)
    time = np.asarray(time, float).ravel()
    event = np.asarray(event).ravel().astype(bool)
    risk = np.asarray(risk, float).ravel()
    if time.size >= 2:
        high = risk > np.median(risk)
    else:
        high = np.zeros(time.size, bool)
    starts = (0.0, *edges[:-1])
    out: dict[str, int] = {}
    for group, member in zip(RISK_GROUPS, (~high, high), strict=True):
        t, e = time[member], event[member]
        for k, (start, end) in enumerate(zip(starts, edges, strict=True)):
            out[wire.atrisk_key(group, k)] = int((t >= start).sum())
            inside = e & (t >= start) & (t < end)
            out[wire.km_events_key(group, k)] = int(inside.sum())
    return out


def km_from_counts(
    atrisk: Sequence[int | None], events: Sequence[int | None]
) -> list[float]:
    """Product-limit survival at the end of each interval from life-table counts.

    ``S_k = prod_{j<=k} (1 - d_j / n_j)``, without sksurv so the coordinator
    can draw curves from the counts sites send.

    Parameters
    ----------
    atrisk : sequence of int
        Patients at risk at the start of each interval (``n_j``).
    events : sequence of int
        Events in each interval (``d_j``).

    Returns
    -------
    list of float
        One value per interval, stopping before the first interval whose
        at-risk count is 0 or missing (or whose event count is missing).

    Raises
    ------
    ValueError
        If an interval has negative counts or more events than patients at
        risk: counts that no site's data can produce.
    """
    out: list[float] = []
    surv = 1.0
    for k, n in enumerate(atrisk):
        d = events[k] if k < len(events) else None
        if n is None or n <= 0 or d is None:
            break
        if d < 0 or d > n:
            raise ValueError(
                f"interval {k}: {d} events among {n} patients at risk; the "
                "life-table counts are inconsistent (check the sites' replies)"
            )
        surv *= 1.0 - d / n
        out.append(surv)
    return out


def parse_days(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of days, such as ``"180,365,730"``.

    Raises
    ------
    ValueError
        If the list is empty, or a value is not a finite positive number, or
        the values are not strictly increasing; the message says the fix.
    """
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError(
            f"no days in {text!r}: give comma-separated days, e.g. '180,365,730'"
        )
    days: list[float] = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(
                f"{part!r} in {text!r} is not a number of days: give "
                "comma-separated numbers, e.g. '180,365,730'"
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"{part!r} in {text!r} must be a finite positive number of days"
            )
        days.append(value)
    if any(b <= a for a, b in zip(days, days[1:], strict=False)):
        raise ValueError(
            f"days {text!r} must be strictly increasing, e.g. '180,365,730'"
        )
    return tuple(days)
