"""Replies that never reach aggregation: failures, refusals, bad case counts.

A site that fails (an error reply), refuses (privacy budget, unusable data;
``refused`` in its metrics) or claims no positive number of training cases is
left out of the round, and the round record says why. What is left goes on to
the update guard (``server/strategy/guard.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from flwr.app import Message

from common import wire
from server.reporting.round_record import RoundRecord, refusal_text
from server.strategy.replies import metrics_of

log = logging.getLogger("kidneyfl.server")

# (site, reply, its metrics): a train reply that may enter the aggregate.
Candidate = tuple[str, Message, dict[str, float]]
SiteOf = Callable[[Message], str]


def train_candidates(
    rec: RoundRecord, replies: list[Message], site_of: SiteOf
) -> list[Candidate]:
    """The train replies that may enter the aggregate; the others are recorded
    in ``rec`` as failed, refused or rejected."""
    candidates: list[Candidate] = []
    for msg in replies:
        site = site_of(msg)
        if msg.has_error():
            rec.failed[site] = str(msg.error.reason)[:500]
            log.warning(
                "site %s failed round %d: %s", site, rec.round, msg.error.reason
            )
            continue
        metrics = metrics_of(msg)
        if metrics.get(wire.REFUSED, 0):
            reason = refusal_text(msg)
            rec.refused[site] = reason
            log.warning("site %s refused round %d: %s", site, rec.round, reason)
            continue
        n = metrics.get(wire.NUM_EXAMPLES, math.nan)
        if not (math.isfinite(n) and n > 0):
            why = "num-examples is missing or not a positive number of cases"
            rec.rejected[site] = why
            log.warning("update from %s rejected in round %d: %s", site, rec.round, why)
            continue
        candidates.append((site, msg, metrics))
    return candidates


def record_evaluation(
    rec: RoundRecord, replies: list[Message], site_of: SiteOf
) -> None:
    """Each evaluate reply's metrics into ``rec``, or why the site has none.

    A site that failed or refused training keeps that first reason.
    """
    for msg in replies:
        site = site_of(msg)
        if msg.has_error():
            rec.failed.setdefault(site, str(msg.error.reason)[:500])
            continue
        metrics = metrics_of(msg)
        if metrics.get(wire.REFUSED, 0):
            rec.refused.setdefault(site, f"evaluation: {refusal_text(msg)}")
            log.warning("site %s refused evaluation: %s", site, refusal_text(msg))
            continue
        rec.evaluate[site] = metrics
