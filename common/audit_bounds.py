"""Empirical privacy lower bounds: the statistics of a privacy audit.

Two ways of turning an attack's success into a lower bound on epsilon, both
plain numpy/scipy (no ML):

- **One-run audit** (Steinke, Nasr and Jagielski, NeurIPS 2023, "Privacy
  Auditing with One (1) Training Run", Appendix D): ``m`` canaries, each
  included with probability 1/2; the auditor guesses "in" for the ``k+``
  highest scores and "out" for the ``k-`` lowest. Under (eps, delta)-DP the
  number of correct guesses is stochastically dominated by a binomial with
  success probability ``e^eps / (1 + e^eps)`` (plus a delta term), so many
  correct guesses refute small epsilons. :func:`one_run_epsilon_lower_bound`
  is the largest epsilon refuted at the given confidence.
- **Membership inference at fixed false-positive rates**: an (eps, delta)-DP
  model limits any attack to ``TPR <= e^eps FPR + delta``. With Clopper-Pearson
  intervals on both rates, ``eps_lb = log((TPR_lo - delta) / FPR_hi)``.

Scores: higher means "more likely a member" throughout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def p_value_dp_audit(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of ``>= v`` correct guesses out of ``r`` under (eps, delta)-DP.

    Steinke et al. (2023), Appendix D: ``m`` canaries randomised, ``r`` guesses
    made (abstentions excluded), ``v`` of them correct.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got {eps}, {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0 or delta == 0:
        return min(beta, 1.0)
    # alpha = max_i P[v > Binomial(r, q) >= v - i] / i, i = 1..v
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = 0.95
) -> float:
    """Largest epsilon that ``v`` correct guesses of ``r`` refute at ``confidence``.

    Parameters
    ----------
    m : int
        Canaries, each included independently with probability 1/2.
    r : int
        Guesses made (``k+ + k-``).
    v : int
        Correct guesses.
    delta : float
        The delta of the guarantee being audited.
    confidence : float
        E.g. 0.95: a correct (eps, delta)-DP mechanism yields a bound above
        its eps with probability at most 5 %.

    Returns
    -------
    float
        The lower bound; 0.0 when not even epsilon 0 is refuted.
    """
    p = 1.0 - confidence
    if not 0 < p < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if p_value_dp_audit(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_dp_audit(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 1e3:  # v = r = m large and delta = 0: no finite bound needed
            return lo
    for _ in range(50):  # bisection: p-value is monotone in eps
        mid = (lo + hi) / 2
        if p_value_dp_audit(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class GuessResult:
    """The outcome of top-k / bottom-k guessing on the canaries."""

    m: int
    k_pos: int
    k_neg: int
    correct: int
    epsilon_lb: float
    confidence: float

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


def guess_and_bound(
    scores: np.ndarray,
    included: np.ndarray,
    k_pos: int,
    k_neg: int,
    delta: float,
    confidence: float = 0.95,
) -> GuessResult:
    """Guess "in" for the ``k_pos`` highest scores and "out" for the ``k_neg``
    lowest, count the correct guesses and bound epsilon (Steinke et al.)."""
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if len(included) != m or k_pos + k_neg > m or min(k_pos, k_neg) < 0:
        raise ValueError(
            f"need as many inclusion flags as scores ({m}) and k+ + k- <= m, got "
            f"{len(included)} flags, k+={k_pos}, k-={k_neg}"
        )
    order = np.argsort(scores, kind="stable")
    top, bottom = order[m - k_pos :], order[:k_neg]
    correct = int(included[top].sum() + (~included[bottom]).sum())
    eps = one_run_epsilon_lower_bound(m, k_pos + k_neg, correct, delta, confidence)
    return GuessResult(m, k_pos, k_neg, correct, eps, confidence)


def best_guess_bound(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    ks: tuple[int, ...] | None = None,
) -> GuessResult:
    """:func:`guess_and_bound` for each ``k`` in ``ks`` (``k+ = k- = k``); the
    largest bound.

    Choosing k after seeing the scores costs confidence: each of the ``len(ks)``
    tries is run at ``1 - (1 - confidence) / len(ks)`` (Bonferroni), so the
    reported bound holds at ``confidence`` overall.
    """
    m = len(scores)
    if ks is None:
        ks = tuple(k for k in (m // 20, m // 10, m // 4) if k >= 1)
    if not ks:
        raise ValueError(f"too few canaries ({m}) to guess; use at least 4")
    each = 1.0 - (1.0 - confidence) / len(ks)
    results = [guess_and_bound(scores, included, k, k, delta, each) for k in ks]
    best = max(results, key=lambda g: (g.epsilon_lb, g.k_pos))  # ties: most k
    return GuessResult(
        best.m, best.k_pos, best.k_neg, best.correct, best.epsilon_lb, confidence
    )


# -- membership inference: ROC, TPR at low FPR, Clopper-Pearson bound -----------
def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Two-sided ``1 - alpha`` Clopper-Pearson interval of a binomial rate."""
    if n == 0:
        return 0.0, 1.0
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def attack_auc(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[float, float]:
    """AUC (ties count half) and its Hanley-McNeil standard error."""
    x, y = np.asarray(scores_in, float), np.asarray(scores_out, float)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("need members and non-members to compute an AUC")
    auc = float(stats.mannwhitneyu(x, y, alternative="two-sided").statistic) / (n1 * n2)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n2 - 1) * (q2 - auc**2)) / (
        n1 * n2
    )
    return auc, math.sqrt(max(var, 0.0))


@dataclass(frozen=True)
class OperatingPoint:
    """One threshold of an attack, chosen for a target false-positive rate."""

    target_fpr: float
    threshold: float
    tp: int
    n_in: int
    fp: int
    n_out: int
    tpr: float
    fpr: float
    tpr_ci: tuple[float, float]
    fpr_ci: tuple[float, float]
    epsilon_lb: float

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


def epsilon_from_rates(
    tp: int, n_in: int, fp: int, n_out: int, delta: float, confidence: float = 0.95
) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """``max(0, log((TPR_lo - delta) / FPR_hi))`` with Clopper-Pearson bounds.

    Both one-sided bounds are taken at ``(1 - confidence) / 2`` each, so that
    they hold together at ``confidence`` (the two-sided intervals returned are
    at that same level per rate).
    """
    alpha = 1.0 - confidence  # each two-sided interval at 1 - alpha
    tpr_ci = clopper_pearson(tp, n_in, alpha)
    fpr_ci = clopper_pearson(fp, n_out, alpha)
    gain = tpr_ci[0] - delta
    eps = math.log(gain / fpr_ci[1]) if gain > 0 and fpr_ci[1] > 0 else 0.0
    return max(0.0, eps), tpr_ci, fpr_ci


def operating_point(
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    target_fpr: float,
    delta: float,
    confidence: float = 0.95,
) -> OperatingPoint:
    """The attack at the lowest threshold whose empirical FPR is <= ``target_fpr``.

    With ``n_out`` non-members the smallest resolvable nonzero FPR is
    ``1 / n_out``; below it the threshold admits no non-member at all, and the
    Clopper-Pearson upper bound on FPR (about ``3 / n_out``) limits the bound.
    """
    x, y = np.sort(np.asarray(scores_in, float)), np.sort(np.asarray(scores_out, float))
    n_in, n_out = len(x), len(y)
    allowed = int(math.floor(target_fpr * n_out))  # false positives allowed
    # predict member when score > threshold; with `allowed` non-members above it
    threshold = float(y[n_out - allowed - 1]) if allowed < n_out else -math.inf
    tp = int(np.sum(x > threshold))
    fp = int(np.sum(y > threshold))
    eps, tpr_ci, fpr_ci = epsilon_from_rates(tp, n_in, fp, n_out, delta, confidence)
    return OperatingPoint(
        target_fpr,
        threshold,
        tp,
        n_in,
        fp,
        n_out,
        tp / n_in if n_in else 0.0,
        fp / n_out if n_out else 0.0,
        tpr_ci,
        fpr_ci,
        eps,
    )
