"""The inner strategy's aggregate under the weight cap.

No site's share of a case-weighted aggregate is more than ``max_site_weight``,
whatever ``num-examples`` it claims: the inner strategy sees the capped shares
as ``num-examples`` (the round record keeps the claims), and metric records cut
to the keys every accepted reply carries (``server.strategy.replies.for_inner``).

For FedAvg and FedProx, whose aggregate is exactly the case-weighted mean plus
``train_metrics_aggr_fn`` (FedProx only adds a config value), the mean comes
from the update guard's single pass over the updates, as Flower's
``aggregate_arrayrecords`` computes it, instead of handing the replies to
Flower to decode a second time: a deliberate departure from "let Flower
aggregate", for speed (benchmarks/aggregation.py). Every other strategy, and
FedAvg under central DP, aggregates through Flower's own ``aggregate_train``.
"""

from __future__ import annotations

import logging
import math
from typing import cast

from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import (
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from common import wire
from server.reporting.round_record import RoundRecord
from server.strategy.aggregators import base_strategy
from server.strategy.guard import Accepted
from server.strategy.replies import for_inner, part, records_of
from server.strategy.updates import scan_updates

# Strategies whose aggregate_train is exactly aggregate_arrayrecords' weighted
# mean plus train_metrics_aggr_fn (FedProx only adds a config value).
_MEAN_STRATEGIES = (FedAvg, FedProx)
# Strategies that ignore num-examples (Krum keeps one whole update).
_UNWEIGHTED = (FedMedian, FedTrimmedAvg, Krum)

log = logging.getLogger("kidneyfl.server")


class CappedMean:
    """Hands the accepted updates to ``inner`` under the weight cap.

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that aggregates.
    max_site_weight : float
        Largest share of a case-weighted aggregate any one site may hold
        (``max-site-weight``); 1 is no cap.
    """

    def __init__(self, inner: Strategy, max_site_weight: float = 1.0) -> None:
        if not 0 < max_site_weight <= 1:
            raise ValueError(
                f"max-site-weight must be in (0, 1], got {max_site_weight}"
            )
        self.inner = inner
        self.max_site_weight = max_site_weight

    def for_inner(self, msgs: list[Message]) -> tuple[list[Message], list[float]]:
        """:func:`server.strategy.replies.for_inner` for the inner strategy."""
        weighted = not isinstance(base_strategy(self.inner), _UNWEIGHTED)
        return for_inner(msgs, self.max_site_weight, weighted)

    def guard_factors(self, msgs: list[Message]) -> list[float] | None:
        """The mean's weights for these replies as the inner strategy will see
        them (capped), for the guard's pass."""
        return self.factors(self.for_inner(msgs)[0])

    def factors(self, msgs: list[Message]) -> list[float] | None:
        """Flower's FedAvg weights (num-examples / total) for these replies (as
        :meth:`for_inner` gives them), or None where Flower aggregates itself
        (other strategies, odd replies)."""
        if type(self.inner) not in _MEAN_STRATEGIES or not msgs:
            return None
        key = cast(FedAvg, self.inner).weighted_by_key
        contents = [m.content for m in msgs]
        try:
            validate_message_reply_consistency(contents, key, check_arrayrecord=True)
        except InconsistentMessageReplies:
            return None  # Flower's aggregate_train reports it
        # as aggregate_arrayrecords: the first (only) MetricRecord's weight
        weights = [
            float(cast(float, next(records_of(c, MetricRecord))[key])) for c in contents
        ]
        total = sum(weights)
        if total == 0 or not math.isfinite(total):
            return None
        return [w / total for w in weights]

    def aggregate(
        self,
        global_round: int,
        rec: RoundRecord,
        accepted: list[Accepted],
        mean: dict[str, Array] | None,
        sent: ArrayRecord | None,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg/FedProx: the guard's mean and Flower's metric aggregation;
        every other strategy: Flower's own aggregate_train. Both see the capped
        shares, which the round record keeps."""
        inputs, shares = self.for_inner([msg for _, msg in accepted])
        self._record_shares(rec, [site for site, _ in accepted], shares)
        if mean is None and sent is not None:
            factors = self.factors(inputs)
            if factors is not None:  # some update was rejected: average again
                _, mean = scan_updates(
                    sent, [part(m, wire.ARRAYS, ArrayRecord) for m in inputs], factors
                )
        if mean is None:
            return self.inner.aggregate_train(global_round, inputs)
        inner = cast(FedAvg, self.inner)
        contents = [m.content for m in inputs]
        # Flower's key order: the first reply's
        keys = next(records_of(contents[0], ArrayRecord)).keys()
        arrays = ArrayRecord({k: mean[k] for k in keys})
        return arrays, inner.train_metrics_aggr_fn(contents, inner.weighted_by_key)

    def _record_shares(
        self, rec: RoundRecord, sites: list[str], shares: list[float]
    ) -> None:
        """Each site's share, and the sites whose share the cap lowered."""
        rec.weights = dict(zip(sites, shares, strict=False))
        claims = [rec.train[site][wire.NUM_EXAMPLES] for site in sites]
        rec.capped = [
            site
            for site, share, n in zip(sites, shares, claims, strict=False)
            if share < n / sum(claims)
        ]
        if rec.capped:
            log.info(
                "round %d: max-site-weight %g caps %s",
                rec.round,
                self.max_site_weight,
                ", ".join(rec.capped),
            )
