"""One round's record, and what the report makes of it: no Flower here.

``RoundRecord`` is what the coordinator's strategy wrapper collects per round
(aggregates only, per site); :func:`weighted_eval_means` and
:func:`refusal_text` turn replies and records into what ``metrics.jsonl``, the
terminal and ``report.html`` show. ``kidneyfl report`` reads them without
importing Flower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common import wire

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


def refusal_text(msg: Message) -> str:
    """A refusal's sentence and its stable code, as the site sent them."""
    site = msg.content.config_records.get(wire.SITE, {})
    reason = str(site.get(wire.REFUSAL_REASON, "refused"))[:500]
    code = site.get(wire.REFUSAL_CODE)
    return f"{reason} [{code}]" if code else reason


def weighted_eval_means(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Case-weighted mean of each evaluation metric over sites.

    Each metric is averaged over the sites that released it, weighted by the
    cases it is a mean over (``wire.weight_key``: the cases with a region for
    its Dice, the cases without it for its false positives, else all
    validation cases). A site that withholds its validation metrics (its own
    choice, ``metrics-withheld``) neither counts nor drags the others' means.
    Case counts are summed.
    """
    skip = {wire.NUM_VAL_CASES, wire.NUM_EXAMPLES, wire.METRICS_WITHHELD}
    skip |= {wire.REFUSED}
    keys = set().union(*(set(m) for m in per_site.values())) - skip
    out = {}
    for k in sorted(keys):
        have = [m for m in per_site.values() if k in m]
        if k.startswith("cases-"):
            out[k] = float(sum(m[k] for m in have))
            continue
        weights = [
            m.get(wire.weight_key(k), m.get(wire.NUM_VAL_CASES, 0.0)) for m in have
        ]
        total = sum(weights)
        if total > 0:
            out[k] = sum(m[k] * w for m, w in zip(have, weights, strict=True)) / total
    return out
