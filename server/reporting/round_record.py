"""One round's record, and what the report makes of it: no Flower here.

``RoundRecord`` is what the coordinator's strategy wrapper collects per round
(aggregates only, per site); :func:`weighted_eval_means` and
:func:`refusal_text` turn replies and records into what ``metrics.jsonl``, the
terminal and ``report.html`` show. ``kidneyfl report`` reads them without
importing Flower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common import wire
from common.contract import safe_text
from common.shares import capped_shares

if TYPE_CHECKING:
    from flwr.app import Message


@dataclass
class RoundRecord:
    """What one round produced, per site. Aggregates only."""

    round: int
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    aggregated: bool = False
    # L2 norm of (update - global model) of each valid update, for the norm rule
    update_norms: dict[str, float] = field(default_factory=dict)
    # each aggregated site's share of a case-weighted aggregate (after the cap),
    # and the sites whose share the cap lowered
    weights: dict[str, float] = field(default_factory=dict)
    capped: list[str] = field(default_factory=list)
    # why the round's aggregate was not kept (not finite, outside the guard's
    # bounds, or the strategy failed); empty when it was, or none was made.
    # The round's checkpoint then holds the last good model.
    aggregate_failed: str = ""
    # max-site-weight: the largest share one site has in any case-weighted
    # mean of this round, evaluation means included (:meth:`eval_means`)
    weight_cap: float = 1.0

    def eval_means(self) -> dict[str, float]:
        """The round's case-weighted evaluation means, under its weight cap."""
        return weighted_eval_means(self.evaluate, self.weight_cap)


def refusal_text(msg: Message) -> str:
    """A refusal's sentence and its stable code, as the site sent them, with
    control characters and non-ASCII escaped (:func:`common.contract.safe_text`)."""
    site = msg.content.config_records.get(wire.SITE, {})
    reason = safe_text(site.get(wire.REFUSAL_REASON, "refused"), 500)
    code = site.get(wire.REFUSAL_CODE)
    return f"{reason} [{safe_text(code, 40)}]" if code else reason


def weighted_eval_means(
    per_site: dict[str, dict[str, float]], cap: float = 1.0
) -> dict[str, float]:
    """Case-weighted mean of each evaluation metric over sites.

    Each metric is averaged over the sites that released it, weighted by the
    cases it is a mean over (``wire.weight_key``: the cases with a region for
    its Dice, the cases without it for its false positives, else all
    validation cases; the patients with an outcome for a prognosis score). A
    site that withholds its validation metrics (its own
    choice, ``metrics-withheld``) neither counts nor drags the others' means;
    nor does a value that is not a finite number (an undefined score), or one
    whose weight is not a finite count >= 0. Case counts and life-table
    event counts are summed (``wire.is_summed``).

    No site's share of a mean is more than ``cap`` (``max-site-weight``, as in
    the aggregate: :func:`common.shares.capped_shares`), so a site that claims
    a huge validation set moves the means no more than the cap allows. Where
    the cap does not bind, the mean is ``sum(w x v) / sum(w)`` as before.
    """
    skip = {wire.NUM_VAL_CASES, wire.NUM_EXAMPLES, wire.METRICS_WITHHELD}
    skip |= {wire.REFUSED, wire.DATA_SYNTHETIC, wire.OOD_N}
    keys = set().union(*(set(m) for m in per_site.values())) - skip
    out = {}
    for k in sorted(keys):
        if wire.is_summed(k):
            total = math.fsum(
                float(m[k]) for m in per_site.values() if _count(m.get(k)) is not None
            )
            if math.isfinite(total):
                out[k] = total
            continue
        pairs = [
            (float(m[k]), w)
            for m in per_site.values()
            if k in m
            and _finite(m[k])
            and (w := _count(m.get(wire.weight_key(k), m.get(wire.NUM_VAL_CASES, 0.0))))
            is not None
        ]
        mean = _capped_mean(pairs, cap)
        if mean is not None:
            out[k] = mean
    return out


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _count(value: object) -> float | None:
    """A weight: a finite number >= 0, else None (the value is left out)."""
    return float(value) if _finite(value) and value >= 0 else None  # type: ignore[operator]


def _capped_mean(pairs: list[tuple[float, float]], cap: float) -> float | None:
    """Mean of values by weights, no share above ``cap``; None without weight."""
    values = [v for v, _ in pairs]
    weights = [w for _, w in pairs]
    total = sum(weights)
    if not total > 0 or not math.isfinite(total):
        return None
    mean = sum(v * w for v, w in pairs) / total
    shares = capped_shares(weights, cap)
    if any(s != w / total for s, w in zip(shares, weights, strict=True)) or not (
        math.isfinite(mean)
    ):
        mean = sum(s * v for s, v in zip(shares, values, strict=True))
    return mean if math.isfinite(mean) else None
