"""Aggregation: a Flower strategy, wrapped with what a consortium needs.

``SiteAwareStrategy`` wraps any ``flwr.serverapp.strategy.Strategy`` (as Flower's
own DP wrappers do) and adds, without copying Flower's round loop:

- refusals: a site that refuses a round (privacy budget, unusable data) is left
  out of aggregation, and why is recorded;
- the update guard: a reply whose arrays have missing or extra keys, other
  shapes or dtypes, or NaN/Inf is rejected before aggregation, and so is one
  whose distance from the global model (L2 norm of update - global) is more
  than ``norm_factor`` times the median of the round's other updates (more for
  a site whose DP noise predicts a larger update, ``server/influence.py``), and
  so is one whose ``num-examples`` is not a positive number; the round goes on
  with the rest, and is skipped (global model unchanged) if too few remain;
- the weight cap: no site's share of a case-weighted aggregate is more than
  ``max_site_weight``, whatever ``num-examples`` it claims; the inner strategy
  sees the capped shares as ``num-examples`` (the round record keeps the
  claims), and metric records cut to the keys every accepted reply carries;
- rounds: the inner strategy sees the round counted across resumes (FedAdam's
  bias correction depends on it), its aggregate keeps the global model's dtypes,
  and its server state (moments, momentum) can be exported for checkpoints;
- bookkeeping: per-site metrics, a checkpoint and a ``metrics.jsonl`` line at
  the end of every round, via the ``on_round_end`` callback.

The guard reads each update once (``server/updates.py``). For FedAvg and FedProx,
whose aggregate is exactly the case-weighted mean, that same pass also computes
the mean, as Flower's ``aggregate_arrayrecords`` does, instead of handing the
replies to Flower to decode a second time: a deliberate departure from "let
Flower aggregate", for speed (benchmarks/aggregation.py). Every other strategy,
and FedAvg under central DP, aggregates through Flower's own ``aggregate_train``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
)
from flwr.serverapp import Grid
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
from server.aggregators import (
    base_strategy,
    build_strategy,
    export_strategy_state,
    import_strategy_state,
)
from server.influence import LocalTraining, norm_outliers
from server.replies import cast_like, for_inner, metrics_of, part, records_of
from server.rounds import RoundRecord, refusal_text, weighted_eval_means
from server.updates import check_update, scan_updates, update_norm

# Strategies whose aggregate_train is exactly aggregate_arrayrecords' weighted
# mean plus train_metrics_aggr_fn (FedProx only adds a config value).
_MEAN_STRATEGIES = (FedAvg, FedProx)
# Strategies that ignore num-examples (Krum keeps one whole update).
_UNWEIGHTED = (FedMedian, FedTrimmedAvg, Krum)

__all__ = [
    "LocalTraining",
    "RoundRecord",
    "SiteAwareStrategy",
    "build_strategy",
    "check_update",
    "norm_outliers",
    "update_norm",
    "weighted_eval_means",
]

log = logging.getLogger("kidneyfl.server")


class SiteAwareStrategy(Strategy):
    """Wrap ``inner`` with refusals, the update guard and per-round bookkeeping.

    Parameters
    ----------
    inner : Strategy
        A Flower strategy that does the aggregation.
    min_sites : int
        Fewest accepted updates for a round to aggregate.
    round_offset : int
        Rounds already done before this run (resume); Flower counts from 1.
    base_config : dict
        Sent to sites with every message (run id, total rounds).
    on_round_end : callable
        ``on_round_end(record, arrays)`` after each round's evaluation.
    site_names : dict
        Registered node names (deployment) by node id; replies' declared
        names are used otherwise.
    norm_factor : float
        Reject an update whose norm (update - global) is more than this many
        times the median of the round's other updates; 0 turns the rule off.
    max_site_weight : float
        Largest share of a case-weighted aggregate any one site may hold
        (``max-site-weight``); 1 (the default here) is no cap.
    training : LocalTraining, optional
        The plan's local training, to widen the norm rule for a site's expected
        DP noise; without it every site gets the same bound.
    """

    def __init__(
        self,
        inner: Strategy,
        min_sites: int,
        round_offset: int,
        base_config: dict[str, Any],
        on_round_end: Callable[[RoundRecord, ArrayRecord], None],
        site_names: dict[int, str] | None = None,
        norm_factor: float = 0.0,
        max_site_weight: float = 1.0,
        training: LocalTraining | None = None,
    ) -> None:
        if not 0 < max_site_weight <= 1:
            raise ValueError(
                f"max-site-weight must be in (0, 1], got {max_site_weight}"
            )
        self.inner = inner
        self.norm_factor = norm_factor
        self.max_site_weight = max_site_weight
        self.training = training
        self.min_sites = min_sites
        self.round_offset = round_offset
        self.base_config = base_config
        self.on_round_end = on_round_end
        self.site_names = dict(site_names or {})
        self._sent: ArrayRecord | None = None
        self._current: RoundRecord | None = None
        self._asked: list[Message] = []

    # -- helpers ---------------------------------------------------------------
    def global_round(self, server_round: int) -> int:
        """Round number across resumes."""
        return self.round_offset + server_round

    def _config(self, config: ConfigRecord, server_round: int) -> ConfigRecord:
        for k, v in self.base_config.items():
            config[k] = v
        config[wire.GLOBAL_ROUND] = self.global_round(server_round)
        return config

    def site_of(self, msg: Message) -> str:
        """The site's name: registered name first, else what the reply declares."""
        node = self.node_of(msg)
        if node in self.site_names:
            return self.site_names[node]
        site = None if msg.has_error() else part(msg, wire.SITE, ConfigRecord)
        if site is not None:
            name = str(site.get(wire.SITE_NAME, ""))
            if name and name != "unknown":
                return name
        return f"node-{node}"

    def _refresh_names(self, grid: Grid) -> None:
        # A site that (re)joins mid-run keeps its registered name.
        get_nodes = getattr(grid, "get_nodes", None)
        if get_nodes is None:
            return
        for node in get_nodes():
            name = getattr(node, "name", None)
            if name:
                self.site_names[node.node_id] = str(name)

    def _ask(self, messages: Iterable[Message]) -> list[Message]:
        self._asked = list(messages)
        return self._asked

    def node_of(self, reply: Message) -> int:
        """The site a reply is about. The SuperLink answers for a dead node
        with an error reply from itself, so map it back through the request."""
        # Flower fills message ids in when it sends the messages we return.
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in self._asked}
        return asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _note_silent(self, rec: RoundRecord, replies: list[Message]) -> None:
        # Flower drops sites that do not answer before round-timeout silently.
        answered = {self.node_of(m) for m in replies}
        asked = {m.metadata.dst_node_id for m in self._asked}
        for node in sorted(asked - answered):
            site = self.site_names.get(node, f"node-{node}")
            rec.failed.setdefault(site, "no reply within round-timeout")
            log.warning("site %s did not answer in round %d", site, rec.round)

    def _record(self, server_round: int) -> RoundRecord:
        g = self.global_round(server_round)
        if self._current is None or self._current.round != g:
            self._current = RoundRecord(round=g)
        return self._current

    # -- Strategy interface ------------------------------------------------------
    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        log.info("SiteAwareStrategy (refusals, update guard, checkpoints) around:")
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember what was sent (the guard's reference), then delegate."""
        self._sent = arrays
        self._record(server_round)
        self._refresh_names(grid)
        return self._ask(
            self.inner.configure_train(
                self.global_round(server_round),
                arrays,
                self._config(config, server_round),
                grid,
            )
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop refusals and invalid updates, then average the rest."""
        rec = self._record(server_round)
        replies = list(replies)
        self._note_silent(rec, replies)
        candidates: list[tuple[str, Message, dict[str, float]]] = []
        for msg in replies:
            site = self.site_of(msg)
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
                log.warning(
                    "update from %s rejected in round %d: %s", site, rec.round, why
                )
                continue
            candidates.append((site, msg, metrics))
        accepted, mean = self._guard(rec, candidates)
        if len(accepted) < self.min_sites:
            log.warning(
                "round %d skipped: %d valid update(s), %d needed; "
                "global model unchanged",
                rec.round,
                len(accepted),
                self.min_sites,
            )
            return None, None
        arrays, metrics = self._aggregate(server_round, rec, accepted, mean)
        if arrays is None:  # e.g. Bulyan with too few replies
            log.warning("round %d: %s did not aggregate", rec.round, _name(self))
            return None, metrics
        rec.aggregated = True
        if self._sent is not None:
            arrays = cast_like(self._sent, arrays)
        return arrays, metrics

    def _guard(
        self, rec: RoundRecord, candidates: list[tuple[str, Message, dict[str, float]]]
    ) -> tuple[list[tuple[str, Message]], dict[str, Array] | None]:
        """The update guard over the round's replies: the accepted ones (with
        their sites) and, for FedAvg/FedProx when none was rejected, their mean."""
        if self._sent is None:  # nothing to compare with
            rec.train.update({site: metrics for site, _, metrics in candidates})
            return [(site, msg) for site, msg, _ in candidates], None
        msgs = [msg for _, msg, _ in candidates]
        factors = (
            self._mean_factors(self._for_inner(msgs)[0])
            if len(msgs) >= self.min_sites
            else None
        )
        scans, mean = scan_updates(
            self._sent,
            [part(m, wire.ARRAYS, ArrayRecord) for m in msgs],
            factors,
        )
        passed: list[tuple[str, Message]] = []
        norms: dict[str, float] = {}
        scales: dict[str, float] = {}
        for (site, msg, metrics), scan in zip(candidates, scans, strict=True):
            if scan.problem:
                rec.rejected[site] = scan.problem
                log.warning(
                    "update from %s rejected in round %d: %s",
                    site,
                    rec.round,
                    scan.problem,
                )
                continue
            rec.train[site] = metrics
            passed.append((site, msg))
            norms[site] = scan.norm
            if self.training is not None:
                scales[site] = self.training.noise_scale(metrics)
        rec.update_norms.update(norms)
        outliers = norm_outliers(norms, self.norm_factor, scales)
        for site, why in outliers.items():
            rec.rejected[site] = why
            rec.train.pop(site, None)
            log.warning("update from %s rejected in round %d: %s", site, rec.round, why)
        accepted = [(site, msg) for site, msg in passed if site not in outliers]
        return accepted, mean if len(accepted) == len(msgs) else None

    def _for_inner(self, msgs: list[Message]) -> tuple[list[Message], list[float]]:
        """:func:`server.replies.for_inner` for the inner strategy."""
        weighted = not isinstance(base_strategy(self.inner), _UNWEIGHTED)
        return for_inner(msgs, self.max_site_weight, weighted)

    def _mean_factors(self, msgs: list[Message]) -> list[float] | None:
        """Flower's FedAvg weights (num-examples / total) for these replies (as
        :meth:`_for_inner` gives them), or None where Flower aggregates itself
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

    def _aggregate(
        self,
        server_round: int,
        rec: RoundRecord,
        accepted: list[tuple[str, Message]],
        mean: dict[str, Array] | None,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg/FedProx: the guard's mean and Flower's metric aggregation;
        every other strategy: Flower's own aggregate_train. Both see the capped
        shares, which the round record keeps."""
        msgs = [msg for _, msg in accepted]
        inputs, shares = self._for_inner(msgs)
        sites = [site for site, _ in accepted]
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
        if mean is None and self._sent is not None:
            factors = self._mean_factors(inputs)
            if factors is not None:  # some update was rejected: average again
                _, mean = scan_updates(
                    self._sent,
                    [part(m, wire.ARRAYS, ArrayRecord) for m in inputs],
                    factors,
                )
        if mean is None:
            return self.inner.aggregate_train(self.global_round(server_round), inputs)
        inner = cast(FedAvg, self.inner)
        contents = [m.content for m in inputs]
        # Flower's key order: the first reply's
        keys = next(records_of(contents[0], ArrayRecord)).keys()
        arrays = ArrayRecord({k: mean[k] for k in keys})
        return arrays, inner.train_metrics_aggr_fn(contents, inner.weighted_by_key)

    # -- server state for checkpoints ---------------------------------------------
    def export_state(self) -> dict[str, np.ndarray]:
        """The inner strategy's server optimiser state (empty if it has none)."""
        return export_strategy_state(self.inner)

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore a state saved by :meth:`export_state` (on resume)."""
        import_strategy_state(self.inner, state)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate; ``arrays`` is the new global model, kept for the checkpoint."""
        self._sent = arrays
        self._refresh_names(grid)
        return self._ask(
            self.inner.configure_evaluate(
                self.global_round(server_round),
                arrays,
                self._config(config, server_round),
                grid,
            )
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Per-site metrics, the case-weighted mean, then the round's bookkeeping."""
        rec = self._record(server_round)
        replies = list(replies)
        self._note_silent(rec, replies)
        for msg in replies:
            site = self.site_of(msg)
            if msg.has_error():
                rec.failed.setdefault(site, str(msg.error.reason)[:500])
                continue
            metrics = metrics_of(msg)
            if metrics.get(wire.REFUSED, 0):
                rec.refused.setdefault(site, f"evaluation: {refusal_text(msg)}")
                log.warning("site %s refused evaluation: %s", site, refusal_text(msg))
                continue
            rec.evaluate[site] = metrics
        means = weighted_eval_means(rec.evaluate)
        if self._sent is not None:
            self.on_round_end(rec, self._sent)
        return MetricRecord(means) if means else None


def _name(strategy: Strategy) -> str:
    inner = getattr(strategy, "inner", strategy)
    return type(inner).__name__
