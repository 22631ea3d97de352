"""Aggregation: a Flower strategy, wrapped with what a consortium needs.

``SiteAwareStrategy`` wraps any ``flwr.serverapp.strategy.Strategy`` (as Flower's
own DP wrappers do) and adds, without copying Flower's round loop:

- the reply contract on the coordinator's side: every reply is read in its
  own catch-all and checked (records, metric keys and values, counts up to
  ``max-site-examples``, the global model's arrays); a site that fails,
  refuses or breaks the contract is left out, and why is recorded
  (``server/strategy/reply_filter.py``; silent sites:
  ``server/strategy/round_sites.py``);
- the update guard (``server/strategy/guard.py``): malformed, non-finite and outlying
  updates are rejected before aggregation; the round goes on with the rest,
  and is skipped (global model unchanged) if too few remain;
- the weight cap (``server/strategy/capped_mean.py``): no site's share of a
  case-weighted aggregate, or of an evaluation mean, is more than
  ``max_site_weight``; FedAvg and FedProx take their mean from the guard's
  single pass over the updates;
- the aggregate checked before it is kept (:func:`guard.aggregate_problem`):
  one that is not finite, not shaped like the global model or further from it
  than the accepted updates allow, or a strategy that raises, fails the round
  (``aggregate_failed`` in ``metrics.jsonl``): Flower keeps the last good
  model, the server optimiser's state is put back, and the next round starts
  from there;
- rounds: the inner strategy sees the round counted across resumes (FedAdam's
  bias correction depends on it), its aggregate keeps the global model's dtypes,
  and its server state (moments, momentum) can be exported for checkpoints;
- bookkeeping: per-site metrics, a checkpoint and a ``metrics.jsonl`` line at
  the end of every round, via the ``on_round_end`` callback
  (``server/round_end.py``);
- the recipe across rounds (both off by default): each train round's learning
  rate in its config (``server/lr_schedule.py``), and a moving average of the
  global model (``server/strategy/ema.py``) that evaluation measures while
  training continues from the raw aggregate.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from common import wire
from common.contract import ReplyRules
from server.reporting.round_record import RoundRecord
from server.strategy.aggregators import (
    export_strategy_state,
    import_strategy_state,
    restore_state,
    snapshot_state,
)
from server.strategy.capped_mean import CappedMean
from server.strategy.ema import ParameterEMA
from server.strategy.guard import Accepted, UpdateGuard, aggregate_problem
from server.strategy.influence import LocalTraining
from server.strategy.replies import cast_like
from server.strategy.reply_filter import (
    Candidate,
    Intake,
    record_evaluation,
    train_candidates,
)
from server.strategy.round_sites import RoundSites

log = logging.getLogger("kidneyfl.server")

# Strategies whose aggregate only averages or selects the accepted updates,
# coordinate by coordinate: their result is bounded by the updates' distances
# (guard.aggregate_problem). Exact types: FedAvgM and FedOpt subclass FedAvg.
_WITHIN_UPDATES = (FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan)


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
    ema_decay : float
        ``ema-decay``: above 0, evaluation gets the moving average of the
        aggregates (:class:`server.strategy.ema.ParameterEMA`) instead of the
        newest one; 0 (the default) is off.
    learning_rates : callable, optional
        ``learning_rates(global_round)``, the rate sent with each train round
        (``server.lr_schedule.learning_rates``); ``None`` sends none.
    rules : ReplyRules, optional
        What a reply may carry (:meth:`common.contract.ReplyRules.from_plan`);
        without it, either task's metrics and the default ``max-site-examples``.
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
        ema_decay: float = 0.0,
        learning_rates: Callable[[int], float] | None = None,
        rules: ReplyRules | None = None,
    ) -> None:
        self.mean = CappedMean(inner, max_site_weight)
        self.rules = rules or ReplyRules()
        self.guard = UpdateGuard(min_sites, norm_factor, training)
        self.sites = RoundSites(site_names)
        self.inner = inner
        self.min_sites = min_sites
        self.round_offset = round_offset
        self.base_config = base_config
        self.on_round_end = on_round_end
        self.ema = ParameterEMA(ema_decay) if ema_decay > 0 else None
        self.learning_rates = learning_rates
        self._sent: ArrayRecord | None = None
        self._current: RoundRecord | None = None

    # -- helpers ---------------------------------------------------------------
    def global_round(self, server_round: int) -> int:
        """Round number across resumes."""
        return self.round_offset + server_round

    def site_of(self, msg: Message) -> str:
        """The site's name: registered name first, else what the reply declares."""
        return self.sites.site_of(msg)

    def _config(self, config: ConfigRecord, server_round: int) -> ConfigRecord:
        for k, v in self.base_config.items():
            config[k] = v
        config[wire.GLOBAL_ROUND] = self.global_round(server_round)
        return config

    def _train_config(self, config: ConfigRecord, server_round: int) -> ConfigRecord:
        config = self._config(config, server_round)
        if self.learning_rates is not None:
            rate = self.learning_rates(self.global_round(server_round))
            config[wire.LEARNING_RATE] = float(rate)
        return config

    def _evaluated(self, arrays: ArrayRecord) -> ArrayRecord:
        """What evaluation measures: the moving average once there is one."""
        if self.ema is None or self.ema.state is None:
            return arrays
        return ArrayRecord(self.ema.state)

    def _record(self, server_round: int) -> RoundRecord:
        g = self.global_round(server_round)
        if self._current is None or self._current.round != g:
            self._current = RoundRecord(round=g, weight_cap=self.mean.max_site_weight)
        return self._current

    def _intake(self, message_type: str) -> Intake:
        """How the replies to a request of ``message_type`` are read."""
        return Intake(message_type, self.rules)

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
        self.sites.refresh(grid)
        return self.sites.ask(
            self.inner.configure_train(
                self.global_round(server_round),
                arrays,
                self._train_config(config, server_round),
                grid,
            )
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop refusals and invalid updates, then average the rest.

        Whatever a reply holds, nothing escapes: a round that cannot be
        aggregated returns no model (Flower keeps the last good one) and says
        why in ``aggregate_failed``.
        """
        rec = self._record(server_round)
        snapshot = snapshot_state(self.inner)
        replies = list(replies)
        try:
            return self._aggregate_train(server_round, rec, replies, snapshot)
        except Exception as exc:  # noqa: BLE001 - one round never ends a run
            why = f"aggregation failed ({type(exc).__name__})"
            return self._fail(rec, why, snapshot)
        finally:
            # Each site is told, with its next request, which of its rounds'
            # updates were not used (docs/privacy.md, "Spent, not used").
            try:
                self.sites.note_unused(rec.round, replies, rec.train, rec.aggregated)
            except Exception as exc:  # noqa: BLE001 - bookkeeping never ends a run
                log.error("round %d: unused rounds not noted (%s)", rec.round, exc)

    def _aggregate_train(
        self,
        server_round: int,
        rec: RoundRecord,
        replies: list[Message],
        snapshot: dict[str, Any],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.sites.note_silent(rec, replies)
        candidates = train_candidates(
            rec, replies, self.site_of, self._intake(wire.MSG_TRAIN)
        )
        accepted, mean = self._screen(rec, candidates)
        if len(accepted) < self.min_sites:
            log.warning(
                "round %d skipped: %d valid update(s), %d needed; "
                "global model unchanged",
                rec.round,
                len(accepted),
                self.min_sites,
            )
            return None, None
        arrays, metrics = self.mean.aggregate(
            self.global_round(server_round), rec, accepted, mean, self._sent
        )
        if arrays is None:  # e.g. Bulyan with too few replies
            log.warning(
                "round %d: %s did not aggregate", rec.round, type(self.inner).__name__
            )
            return None, metrics
        if self._sent is not None:
            if set(arrays.keys()) != set(self._sent.keys()):
                why = "the aggregate's array keys differ from the global model's"
                return self._fail(rec, why, snapshot)
            arrays = cast_like(self._sent, arrays)
        within = type(self.inner) in _WITHIN_UPDATES
        norms = [rec.update_norms[site] for site, _ in accepted] if within else None
        problem = aggregate_problem(self._sent, arrays, norms)
        if problem is not None:
            return self._fail(rec, problem, snapshot)
        rec.aggregated = True
        if self.ema is not None:
            self.ema.update(arrays.to_torch_state_dict())
        return arrays, metrics

    def _screen(
        self, rec: RoundRecord, candidates: list[Candidate]
    ) -> tuple[list[Accepted], dict | None]:
        """The guard's verdict; should its joint pass over the round raise,
        each update is screened alone and the one that raises is rejected."""
        try:
            return self.guard.screen(
                rec, self._sent, candidates, self.mean.guard_factors
            )
        except Exception as exc:  # noqa: BLE001 - find the reply that raised
            name = type(exc).__name__
            log.error("round %d: the guard's pass failed (%s)", rec.round, name)
        for site, _, _ in candidates:  # whatever the failed pass wrote
            rec.train.pop(site, None)
            rec.update_norms.pop(site, None)
        usable = []
        for site, msg, metrics in candidates:
            try:
                alone = RoundRecord(round=rec.round)
                self.guard.screen(alone, self._sent, [(site, msg, metrics)], _none)
                usable.append((site, msg, metrics))
            except Exception as exc:  # noqa: BLE001
                rec.rejected[site] = f"update could not be read ({type(exc).__name__})"
        return self.guard.screen(rec, self._sent, usable, self.mean.guard_factors)

    def _fail(
        self, rec: RoundRecord, why: str, snapshot: dict[str, Any]
    ) -> tuple[None, None]:
        """Keep nothing of the round's aggregate: no model, no optimiser step."""
        restore_state(self.inner, snapshot)
        rec.aggregated = False
        rec.aggregate_failed = why
        log.error("round %d: aggregate not kept: %s", rec.round, why)
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate; ``arrays`` is the new global model, kept for the checkpoint.

        With ``ema-decay`` the sites evaluate the moving average instead.
        """
        self._sent = arrays
        self.sites.refresh(grid)
        return self.sites.ask(
            self.inner.configure_evaluate(
                self.global_round(server_round),
                self._evaluated(arrays),
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
        try:
            self.sites.note_silent(rec, replies)
            record_evaluation(
                rec, replies, self.site_of, self._intake(wire.MSG_EVALUATE)
            )
        except Exception as exc:  # noqa: BLE001 - the round's bookkeeping goes on
            name = type(exc).__name__
            log.error("round %d: evaluation replies not read (%s)", rec.round, name)
        means = rec.eval_means()
        if self._sent is not None:
            self.on_round_end(rec, self._sent)
        return MetricRecord(means) if means else None

    def evaluate_start(
        self, grid: Grid, arrays: ArrayRecord, timeout: float
    ) -> RoundRecord:
        """Evaluate the starting model at the sites before round 1 (round 0).

        For a pretrained ``initial-checkpoint``: the per-site baseline the
        federation's gain is measured against. The same evaluate message and
        site choices as every round; nothing is trained, aggregated or
        checkpointed.
        """
        self.sites.refresh(grid)
        messages = self.sites.ask(
            self.inner.configure_evaluate(
                0, arrays, self._config(ConfigRecord(), 0), grid
            )
        )
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        rec = RoundRecord(
            round=self.global_round(0), weight_cap=self.mean.max_site_weight
        )
        try:
            self.sites.note_silent(rec, replies)
            record_evaluation(
                rec, replies, self.site_of, self._intake(wire.MSG_EVALUATE)
            )
        except Exception as exc:  # noqa: BLE001 - the start evaluation is a report
            log.error("start evaluation: replies not read (%s)", type(exc).__name__)
        return rec

    # -- server state for checkpoints ---------------------------------------------
    def export_state(self) -> dict[str, np.ndarray]:
        """The inner strategy's server optimiser state (empty if it has none)."""
        return export_strategy_state(self.inner)

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore a state saved by :meth:`export_state` (on resume)."""
        import_strategy_state(self.inner, state)

    def ema_state(self) -> OrderedDict[str, torch.Tensor] | None:
        """The moving average of the global model (None when off or not begun)."""
        return None if self.ema is None else self.ema.state

    def import_ema(self, state: OrderedDict[str, torch.Tensor] | None) -> None:
        """Continue the moving average saved with a checkpoint (on resume)."""
        if self.ema is not None and state is not None:
            self.ema = ParameterEMA(self.ema.decay, state)


def _none(_: list[Message]) -> None:
    """No mean weights: a guard pass that only checks."""
    return None
