"""A train or fine-tune round at the site, one job per function.

After :func:`client.prepare.prepare`: the steps the round runs, the privacy
spend for exactly those steps (before training: :mod:`client.privacy.ledger`),
the seed of what may be reproducible, local training, the export of the
update (refusing NaN/Inf), the site's timing line and the reply's metrics. A
train reply carries the update (FedBN's norm layers as received) and
aggregates; a fine-tune reply carries only validation metrics, the model stays
at the site. Flower-free.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from client.evaluate_round import validation_metrics
from client.local_state import keep_norm_local, save_fine_tuned
from client.prepare import Reply, Request, Round, prepare
from client.privacy.accounting import poisson_schedule
from client.privacy.dpsgd import DPSpec
from client.privacy.ledger import PrivacyLedger, RunSchedule, SiteLimits
from client.timings import record_timing
from client.train import TrainStats, local_train
from common import wire
from common.logs import log_request
from common.models import get_model_spec
from common.weights import export_state

log = logging.getLogger("kidneyfl.client")


@dataclass(frozen=True)
class Schedule:
    """The optimiser steps a round runs, how many make one epoch, and the
    learning rate they take."""

    steps: int
    steps_per_epoch: int
    learning_rate: float


def train_round(request: Request, fine_tune: bool) -> Reply:
    """Local epochs (or fine-tuning steps) from the global weights."""
    r = prepare(request, training=True, default_round=1)
    schedule = round_schedule(r, fine_tune)
    dp, eps_after = spend_budget(r, schedule.steps)
    started = time.perf_counter()
    stats = train_locally(r, schedule, dp, fine_tune)
    state = export_state(r.model)  # refuses NaN/Inf before anything leaves
    kind = "fine-tune" if fine_tune else "train"
    record_timing(
        r.site, r.run_id, r.number, kind, r.load_s, time.perf_counter() - started
    )
    log_round(r, kind, stats, dp, eps_after)
    privacy = privacy_metrics(r, dp, eps_after)
    if fine_tune:
        return fine_tune_reply(r, state, privacy)
    return update_reply(r, state, stats, privacy, dp)


def round_schedule(r: Round, fine_tune: bool) -> Schedule:
    """Steps as Opacus' Poisson loader runs them; fine-tuning's from the plan.

    The rate is checked here, before any budget is spent on the round.
    """
    _, per_epoch = poisson_schedule(r.data.n_train, r.plan.batch_size)
    if fine_tune:
        steps = r.checked.fine_tune_steps
        assert steps is not None  # client.request_guard: required for fine-tuning
    else:
        steps = per_epoch * r.plan.local_epochs
    return Schedule(steps, per_epoch, round_learning_rate(r, fine_tune))


def round_learning_rate(r: Round, fine_tune: bool) -> float:
    """The round's learning rate: the coordinator's (``lr-schedule``) when it
    sends one, else the plan's ``learning-rate``; fine-tuning uses the plan's.

    The privacy accounting does not depend on it: epsilon follows from the
    noise multiplier, the sampling rate and the steps, and the rate only scales
    the clipped, noised gradient (post-processing). A rate sent is a positive
    finite number up to 10, the plan's own bounds (checked with the request,
    :mod:`client.request_guard`).
    """
    sent = None if fine_tune else r.checked.learning_rate
    return r.plan.learning_rate if sent is None else sent


def spend_budget(r: Round, steps: int) -> tuple[DPSpec | None, float]:
    """Calibrate the run's noise and spend this round's budget, before training.

    Calibration, the checks and the ledger entry are one locked step
    (:meth:`PrivacyLedger.spend_round`): the run's noise is bound to the
    schedule it was calibrated for and never below the site's floor, the run
    never takes more steps than were calibrated, and a second training at
    this site (another run, a retried message) sees the spend and cannot also
    pass the ceiling. Returns the DP settings (None without DP) and the
    cumulative epsilon after the round.
    """
    site, plan, p = r.site, r.plan, r.site.privacy
    if not p.enabled:
        return None, float("inf")
    assert p.max_epsilon is not None and p.delta is not None  # the site schema
    total_rounds = r.checked.total_rounds
    assert total_rounds is not None  # client.request_guard: required for training
    schedule = RunSchedule(
        target_epsilon=plan.dp_target_epsilon,
        delta=p.delta,
        batch_size=plan.batch_size,
        total_rounds=total_rounds,
        local_epochs=plan.local_epochs,
        fine_tune_steps=plan.fine_tune_steps,
    )
    limits = SiteLimits(p.max_epsilon, p.run_epsilon_cap, p.min_noise_multiplier)
    ledger = PrivacyLedger(site.state_dir, site.name)
    cal, eps_after = ledger.spend_round(
        r.run_id, schedule, limits, r.data.n_train, r.number, steps, r.data.fingerprint
    )
    mode = get_model_spec(plan.model).grad_sample_mode
    spec = DPSpec(cal.noise_multiplier, plan.dp_max_grad_norm, mode)
    return spec, eps_after


def round_seed(seed: int, rnd: int, site: str) -> int:
    """The seed of the round's augmentation and crops, per site and round.

    They may stay reproducible (they are not the DP mechanism); the noise and
    the Poisson sampling draw from the site's own entropy inside
    :func:`client.privacy.dpsgd.make_private`.
    """
    return (seed * 1_000_003 + rnd * 7919 + zlib.crc32(site.encode())) % 2**31


def train_locally(
    r: Round, schedule: Schedule, dp: DPSpec | None, fine_tune: bool
) -> TrainStats:
    """Train the round's model in place for the scheduled steps."""
    plan = r.plan
    seed = round_seed(plan.seed, r.number, r.site.name)
    r.data.train.set_seed(seed)
    stats = local_train(
        r.model,
        r.data.train,
        r.task.loss(plan),
        epochs=-(-schedule.steps // schedule.steps_per_epoch),
        batch_size=plan.batch_size,
        learning_rate=schedule.learning_rate,
        optimizer=plan.optimizer,
        device=r.device,
        seed=seed,
        dp=dp,
        # FedProx: Flower's strategy sends mu; never while fine-tuning
        proximal_mu=0.0 if fine_tune else r.checked.proximal_mu,
        max_steps=schedule.steps,
        multiplicity=plan.augmentation_multiplicity,
        trainable=plan.trainable_parameters,
    )
    if dp is not None and stats.steps != schedule.steps:
        # local_train runs exactly max_steps; only an empty training set stops
        # it short. The ledger then holds more than ran: an over-count, safe.
        log.warning("ran %d DP steps of the %d accounted", stats.steps, schedule.steps)
    return stats


def log_round(
    r: Round, kind: str, stats: TrainStats, dp: DPSpec | None, eps_after: float
) -> None:
    """The site's log line and request line for a finished round."""
    log.info(
        "site %s %s %d: loss %.4f, %d steps, epsilon %.3f",
        r.site.name,
        "fine-tune after round" if kind == "fine-tune" else "round",
        r.number,
        stats.loss,
        stats.steps,
        eps_after,
    )
    log_request(
        r.site.name,
        kind,
        r.number,
        "trained",
        f"{stats.steps} steps, epsilon {eps_after:.2f}"
        + ("" if dp is not None else f", loss {stats.loss:.3f}"),
    )


def privacy_metrics(r: Round, dp: DPSpec | None, eps_after: float) -> dict[str, Any]:
    """What every train and fine-tune reply says of the privacy spent."""
    return {
        wire.DP_ENABLED: int(dp is not None),
        wire.EPSILON: eps_after,
        wire.DELTA: float(r.site.privacy.delta or 0.0),
        wire.NOISE_MULTIPLIER: dp.noise_multiplier if dp else 0.0,
        wire.REFUSED: 0,
    }


def fine_tune_reply(
    r: Round, state: OrderedDict[str, torch.Tensor], privacy: dict[str, Any]
) -> Reply:
    """Keep the fine-tuned model at the site; reply with its validation metrics."""
    save_fine_tuned(state, r.site, r.run_id)
    values = validation_metrics(r)
    values.update(privacy)
    values[wire.FINE_TUNED] = 1
    values[wire.NUM_EXAMPLES] = r.data.n_train
    return Reply(r.site.name, values)


def update_reply(
    r: Round,
    state: OrderedDict[str, torch.Tensor],
    stats: TrainStats,
    privacy: dict[str, Any],
    dp: DPSpec | None,
) -> Reply:
    """The update (norm layers kept at the site under FedBN) and aggregates."""
    if r.norm:
        state = keep_norm_local(state, r.received, r.norm, r.site, r.run_id)
    metrics = {wire.NUM_EXAMPLES: r.data.n_train, **privacy}
    if dp is None:  # the mean loss on training patients has no DP protection
        metrics[wire.TRAIN_LOSS] = stats.loss
    return Reply(r.site.name, metrics, state)
