"""Aggregation: a Flower strategy, wrapped with what a consortium needs.

``SiteAwareStrategy`` wraps any ``flwr.serverapp.strategy.Strategy`` (as Flower's
own DP wrappers do) and adds, without copying Flower's round loop:

- refusals: a site that refuses a round (privacy budget, unusable data) is left
  out of aggregation, and why is recorded;
- the update guard: a reply whose arrays have missing or extra keys, other
  shapes or dtypes, or NaN/Inf is rejected before aggregation; the round goes on
  with the rest, and is skipped (global model unchanged) if too few remain;
- bookkeeping: per-site metrics, a checkpoint and a ``metrics.jsonl`` line at
  the end of every round, via the ``on_round_end`` callback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from common import wire

log = logging.getLogger("kidneyfl.server")


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


def build_strategy(
    name: str,
    min_sites: int,
    fraction_evaluate: float,
    central_dp: str = "off",
    central_dp_noise: float = 0.0,
    central_dp_clip: float = 1.0,
    num_sites: int | None = None,
) -> Strategy:
    """Flower's own strategy for a plan's ``strategy`` name.

    With ``central_dp="server-fixed"`` it is wrapped in Flower's
    ``DifferentialPrivacyServerSideFixedClipping``: each site's update is clipped
    to ``central_dp_clip`` (L2, relative to the global model) and Gaussian noise
    of std ``central_dp_noise * central_dp_clip / num_sites`` is added to the
    aggregate. That bounds what any one *hospital* can move the model; it is
    on top of, not instead of, the sample-level DP-SGD at every site.
    """
    if name != "fedavg":
        raise ValueError(f"unknown strategy {name!r}; available: fedavg")
    inner = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_sites,
        min_evaluate_nodes=min_sites if fraction_evaluate > 0 else 0,
        min_available_nodes=min_sites,
        weighted_by_key=wire.NUM_EXAMPLES,
    )
    if central_dp == "off":
        return inner
    if central_dp != "server-fixed":
        raise ValueError(f"unknown central-dp {central_dp!r}; use off or server-fixed")
    return DifferentialPrivacyServerSideFixedClipping(
        inner, central_dp_noise, central_dp_clip, max(num_sites or min_sites, 1)
    )


def check_update(reference: ArrayRecord, update: ArrayRecord | None) -> str | None:
    """Why an update may not be aggregated, or None if it may.

    The reference is the global model the site was sent.
    """
    if update is None:
        return "reply carries no model arrays"
    ref_keys, got_keys = set(reference.keys()), set(update.keys())
    if ref_keys != got_keys:
        missing = sorted(ref_keys - got_keys)[:3]
        extra = sorted(got_keys - ref_keys)[:3]
        return (
            f"array keys differ from the global model (missing {missing}, "
            f"extra {extra})"
        )
    for key in reference.keys():
        ref, got = reference[key], update[key]
        if tuple(ref.shape) != tuple(got.shape):
            return (
                f"array {key!r} has shape {tuple(got.shape)}, "
                f"expected {tuple(ref.shape)}"
            )
        if ref.dtype != got.dtype:
            return f"array {key!r} has dtype {got.dtype}, expected {ref.dtype}"
        arr = got.numpy()
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            return f"array {key!r} has NaN or Inf values"
    return None


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
    """

    def __init__(
        self,
        inner: Strategy,
        min_sites: int,
        round_offset: int,
        base_config: dict[str, Any],
        on_round_end: Callable[[RoundRecord, ArrayRecord], None],
        site_names: dict[int, str] | None = None,
    ) -> None:
        self.inner = inner
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
        if not msg.has_error() and wire.SITE in msg.content.config_records:
            name = str(msg.content.config_records[wire.SITE].get(wire.SITE_NAME, ""))
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
                server_round, arrays, self._config(config, server_round), grid
            )
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop refusals and invalid updates, then let the inner strategy average."""
        rec = self._record(server_round)
        replies = list(replies)
        self._note_silent(rec, replies)
        accepted: list[Message] = []
        for msg in replies:
            site = self.site_of(msg)
            if msg.has_error():
                rec.failed[site] = str(msg.error.reason)[:500]
                log.warning(
                    "site %s failed round %d: %s", site, rec.round, msg.error.reason
                )
                continue
            metrics = _metrics(msg)
            if metrics.get(wire.REFUSED, 0):
                reason = str(msg.content[wire.SITE].get(wire.REFUSAL_REASON, "refused"))
                rec.refused[site] = reason
                log.warning("site %s refused round %d: %s", site, rec.round, reason)
                continue
            arrays = msg.content.array_records.get(wire.ARRAYS)
            problem = (
                check_update(self._sent, arrays) if self._sent is not None else None
            )
            if problem:
                rec.rejected[site] = problem
                log.warning(
                    "update from %s rejected in round %d: %s", site, rec.round, problem
                )
                continue
            rec.train[site] = metrics
            accepted.append(msg)
        if len(accepted) < self.min_sites:
            log.warning(
                "round %d skipped: %d valid update(s), %d needed; "
                "global model unchanged",
                rec.round,
                len(accepted),
                self.min_sites,
            )
            return None, None
        rec.aggregated = True
        return self.inner.aggregate_train(server_round, accepted)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate; ``arrays`` is the new global model, kept for the checkpoint."""
        self._sent = arrays
        self._refresh_names(grid)
        return self._ask(
            self.inner.configure_evaluate(
                server_round, arrays, self._config(config, server_round), grid
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
            rec.evaluate[site] = _metrics(msg)
        means = weighted_eval_means(rec.evaluate)
        if self._sent is not None:
            self.on_round_end(rec, self._sent)
        return MetricRecord(means) if means else None


def _metrics(msg: Message) -> dict[str, float]:
    record = msg.content.metric_records.get(wire.METRICS)
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


def weighted_eval_means(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Validation-case-weighted mean of each evaluation metric over sites."""
    weights = {s: m.get(wire.NUM_VAL_CASES, 0.0) for s, m in per_site.items()}
    total = sum(weights.values())
    if total <= 0:
        return {}
    keys = set.intersection(*(set(m) for m in per_site.values()))
    keys -= {wire.NUM_VAL_CASES, wire.NUM_EXAMPLES}
    return {
        k: sum(per_site[s][k] * weights[s] for s in per_site) / total
        for k in sorted(keys)
    }
