"""Discrete-time survival for the prognosis task: intervals, loss, curves and
life tables, in torch and numpy only.

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

No scikit-survival here: the coordinator imports this module to draw
Kaplan-Meier curves from the counts sites send (:func:`km_from_counts`); the
site's metrics, which need it, are in :mod:`common.survival_metrics`.

Life-table keys (:func:`km_counts`; names in ``common.wire``):

- ``cases-atrisk-<group>-<k>``, ``km-events-<group>-<k>``: life-table counts
  per predicted risk group, summed across sites by the coordinator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from common import wire

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
