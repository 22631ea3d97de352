"""Epsilon of a DP-SGD history and the noise that reaches a target.

Epsilon is always computed by one tight accountant (Opacus' PRV accountant, an
upper bound within ``EPS_ERROR`` of the exact value) over a whole history of
``(noise multiplier, sample rate, steps)``; where PRV cannot evaluate a
history the RDP accountant, never below the exact value either, answers.
Noise is calibrated for the steps a run actually takes, with the accountant the
ledger reports with (:mod:`client.privacy.ledger`).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

log = logging.getLogger(__name__)

# The accountant new ledgers use. Ledgers written before it (format 1) keep the
# RDP accountant they were checked with: a site's record never changes method
# behind its back.
ACCOUNTANT = "prv"
ACCOUNTANTS = ("prv", "rdp")
# PRV's error bound on epsilon: get_epsilon returns the *upper* end, so the
# reported value is never below the exact one.
EPS_ERROR = 1e-3

History = list[tuple[float, float, int]]


def merged(history: History) -> History:
    """``history`` with the steps of equal (noise, sample rate) pairs added up.

    Composition does not depend on order, so this is the same mechanism; the PRV
    accountant's cost grows with the number of entries, not with the steps.
    Entries are never netted against each other: a step count below 1, a noise
    multiplier that is not above 0 or a rate outside (0, 1] is an error, not a
    term to add (issue 27: an entry of -40 steps once cancelled a 40-step round).

    Raises
    ------
    ValueError
        For an entry no DP-SGD round has.
    """
    steps: dict[tuple[float, float], int] = {}
    for noise, q, n in history:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"a DP-SGD history entry has {n!r} steps (at least 1)")
        if not (math.isfinite(noise) and noise > 0 and math.isfinite(q) and 0 < q <= 1):
            raise ValueError(f"a DP-SGD history entry has noise {noise!r}, rate {q!r}")
        steps[(float(noise), float(q))] = steps.get((float(noise), float(q)), 0) + n
    return [(noise, q, n) for (noise, q), n in sorted(steps.items())]


def epsilon_for(
    history: History,
    delta: float,
    accountant: str = ACCOUNTANT,
    eps_error: float = EPS_ERROR,
) -> float:
    """Epsilon of a DP-SGD history ``[(noise, sample_rate, steps), ...]``.

    ``accountant`` is ``prv`` (tight; the upper end of its error bound) or
    ``rdp``. Where PRV cannot evaluate a history (extreme parameters), the RDP
    value is returned: RDP is never below the exact epsilon either.
    """
    return _epsilon(tuple(merged(history)), float(delta), accountant, eps_error)


@functools.lru_cache(maxsize=256)
def _epsilon(
    hist: tuple[tuple[float, float, int], ...],
    delta: float,
    accountant: str,
    eps_error: float,
) -> float:
    """:func:`epsilon_for` of a merged history; cached, as PRV takes about a
    second per distinct (noise, rate) pair and a round asks for the same
    history several times (before, after, the audit entry)."""
    hist = list(hist)
    if not hist:
        return 0.0
    if accountant == "prv":
        eps = _prv_epsilon(hist, delta, eps_error)
        if eps is not None:
            return eps
    rdp = RDPAccountant()
    rdp.history = hist
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Optimal order", UserWarning)
        return float(rdp.get_epsilon(delta=delta))


def _prv_epsilon(hist: History, delta: float, eps_error: float) -> float | None:
    """PRV's epsilon (upper end of its bound), or None where it cannot answer."""
    try:
        prv = PRVAccountant()
        prv.history = hist
        with np.errstate(divide="ignore"):  # log(1 - q) at q = 1: handled
            eps = float(prv.get_epsilon(delta=delta, eps_error=eps_error))
        if math.isfinite(eps):
            return eps
    except (ValueError, RuntimeError, OverflowError, ZeroDivisionError) as exc:
        log.warning("PRV accountant failed (%s); using RDP (larger)", exc)
    return None


@functools.lru_cache(maxsize=64)
def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = ACCOUNTANT,
) -> float:
    """Noise multiplier so that ``steps`` steps at ``sample_rate`` reach the target.

    Calibrated for the steps actually run over the whole plan (rounds x local
    epochs x steps per epoch), not per round, with the accountant the ledger
    reports with: a bisection to 0.5 % of the noise, then the result is checked
    with :func:`epsilon_for` and raised until it meets the target, so
    calibration never promises less than it spends. Cached per process: every
    site with the same schedule gets the same answer.
    """
    if accountant == "rdp":
        return _rdp_noise(target_epsilon, delta, sample_rate, steps)

    def eps(noise: float, error: float = 0.01) -> float:
        # the search uses PRV's coarser bound (an upper bound as well); the
        # final check below uses the ledger's
        return epsilon_for([(noise, sample_rate, steps)], delta, accountant, error)

    hi = 1.0
    while eps(hi) > target_epsilon:  # bracket: hi meets the target, lo does not
        hi *= 2.0
    lo = hi / 2.0
    while eps(lo) <= target_epsilon and lo > 1e-3:
        hi, lo = lo, lo / 2.0
    while hi - lo > 0.005 * hi:
        mid = (hi + lo) / 2
        hi, lo = (mid, lo) if eps(mid) <= target_epsilon else (hi, mid)
    while eps(hi, EPS_ERROR) > target_epsilon:
        hi *= 1.002
    return hi


def _rdp_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """Opacus' own calibration, for ledgers that keep the RDP accountant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Optimal order", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=0.005,
            )
        )


def poisson_schedule(n_cases: int, batch_size: int) -> tuple[float, int]:
    """Sample rate and steps per epoch, exactly as Opacus' DPDataLoader runs them."""
    steps = max(1, math.ceil(n_cases / batch_size))
    return 1.0 / steps, steps
