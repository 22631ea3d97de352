"""What a claim can buy: case-weighted shares under a weight cap.

The one rule every case-weighted mean at the coordinator uses (the FedAvg
aggregate, the evaluation means, the federated preprocessing plan), so that a
site claiming more patients than it has gains at most ``max-site-weight``.
Plain Python, no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def capped_shares(weights: Sequence[float], cap: float) -> list[float]:
    """Shares ``w_k / sum(w)``, none above ``cap``; the excess goes to the others.

    Water-filling: a share over ``cap`` is set to ``cap`` and what it loses goes
    to the uncapped ones in proportion to their weights, repeated until none is
    over. With ``k`` positive weights and ``cap <= 1 / k`` every positive one
    gets ``1 / k``. ``num-examples`` and every case count are a site's claims;
    the cap bounds what a false one can buy.

    Parameters
    ----------
    weights : sequence of float
        Each update's (or site's) weight, finite and >= 0, at least one > 0.
    cap : float
        Largest share any one may have, in (0, 1].

    Returns
    -------
    list of float
        Finite shares >= 0 summing to 1 (to rounding), none above
        ``max(cap, 1 / k)``. Where no share is over ``cap`` and the weights'
        sum is finite they are exactly ``w_k / sum(w)`` (Flower's FedAvg
        factors, bit for bit); weights whose sum overflows are scaled by the
        largest first, so no share becomes 0 or NaN.

    Raises
    ------
    ValueError
        For a weight that is negative or not finite, no positive weight, or a
        cap outside (0, 1].
    """
    w = [float(x) for x in weights]
    if not w:
        return []
    if not 0 < cap <= 1:
        raise ValueError(f"cap must be in (0, 1], got {cap}")
    if not all(math.isfinite(x) and x >= 0 for x in w) or max(w) <= 0:
        raise ValueError("weights must be finite, >= 0 and not all 0")
    everyone = list(range(len(w)))
    shares = [_proportional(w, everyone)[i] for i in everyone]
    if max(shares) <= cap:
        return shares
    positive = [i for i in everyone if w[i] > 0]
    if cap * len(positive) <= 1.0:
        even = 1.0 / len(positive)
        return [even if x > 0 else 0.0 for x in w]
    capped: set[int] = set()
    while True:
        free = [i for i in positive if i not in capped]
        mass = 1.0 - cap * len(capped)
        part = _proportional(w, free)
        new = {i: mass * part[i] for i in free}
        over = {i for i in free if new[i] > cap}
        if not over:  # cap * k > 1: some weight always stays under the cap
            return [cap if i in capped else new.get(i, 0.0) for i in everyone]
        capped |= over


def _proportional(w: list[float], among: list[int]) -> dict[int, float]:
    """``w_i / sum(w)`` over the indices ``among``; when the sum overflows
    (two claims of 1e308), the weights are divided by the largest first, so no
    share becomes 0 or NaN for the overflow's sake."""
    total = sum(w[i] for i in among)
    if math.isfinite(total):
        return {i: w[i] / total for i in among}  # Flower's factors, exactly
    top = max(w[i] for i in among)
    scaled = {i: w[i] / top for i in among}
    total = sum(scaled.values())
    return {i: x / total for i, x in scaled.items()}
