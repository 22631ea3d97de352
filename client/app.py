"""The site's Flower ClientApp: ``train`` and ``evaluate``, and nothing else.

Only model arrays and aggregate metrics leave through the replies built here.
A site that cannot or will not train (no usable data, damaged ledger, privacy
budget exhausted) answers with a refusal the coordinator understands, not an
exception.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.data import SiteDataError, load_site_cases, raw_volumes
from client.gate import governed
from client.personal import keep_norm_local, overlay_local_norm, save_fine_tuned
from client.privacy import (
    BudgetExceeded,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    check_budget,
    poisson_schedule,
)
from client.task import get_task
from client.timings import record_timing
from client.train import DPSpec, local_train, select_device
from common import wire
from common.config import ConfigError, Plan, SiteConfig, load_plan, load_site_config
from common.fingerprint import site_fingerprint
from common.logs import setup_logging
from common.models import get_model_spec
from common.personal import require_norm_params
from common.tasks import build_plan_model
from common.weights import export_state, import_state

log = logging.getLogger("kidneyfl.client")
app = ClientApp()

# Failures a site reports as a refusal (with the reason) rather than a crash.
REFUSALS = (SiteDataError, LedgerError, BudgetExceeded, ConfigError)


def site_config_path(context: Context, plan: Plan) -> Path:
    """Deployment: ``site-config`` node config. Simulation: one YAML per partition."""
    node = context.node_config
    if "site-config" in node:
        return Path(str(node["site-config"]))
    paths = plan.site_config_paths
    if "partition-id" in node and paths:
        return paths[int(node["partition-id"]) % len(paths)]
    raise ConfigError(
        "no site YAML: start the SuperNode with --node-config "
        "\"site-config='/path/to/site.yaml'\""
    )


def apply_cpu_threads(site: SiteConfig) -> None:
    """Limit torch to the site's ``cpu_threads`` (if set) for this process."""
    if site.cpu_threads is not None:
        import torch

        torch.set_num_threads(site.cpu_threads)


def _setup(msg: Message, context: Context) -> tuple[Plan, SiteConfig]:
    setup_logging()
    plan = load_plan(context.run_config)
    site = load_site_config(site_config_path(context, plan))
    apply_cpu_threads(site)
    cfg = msg.content.config_records.get(wire.CONFIG, {})
    if wire.PREP_SPACING in cfg:  # the federated preprocessing plan
        plan = load_plan(
            {
                **context.run_config,
                "spacing-mm": ",".join(str(v) for v in cfg[wire.PREP_SPACING]),
                "hu-window": ",".join(str(v) for v in cfg[wire.PREP_WINDOW]),
                "patch-size": ",".join(str(int(v)) for v in cfg[wire.PREP_PATCH]),
                "intensity-mean": float(cfg[wire.PREP_MEAN]),
                "intensity-std": float(cfg[wire.PREP_STD]),
            }
        )
    return plan, site


@app.train()
@governed(site_config_path)
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global weights; reply with weights and aggregates."""
    return _train_round(msg, context, fine_tune=False)


@app.train(wire.FINE_TUNE_ACTION)
@governed(site_config_path)
def fine_tune(msg: Message, context: Context) -> Message:
    """Fine-tune the final global model locally; it stays at the site.

    The reply carries only the fine-tuned model's validation metrics (and the
    privacy spent): no arrays, nothing to aggregate.
    """
    return _train_round(msg, context, fine_tune=True)


def _train_round(msg: Message, context: Context, fine_tune: bool) -> Message:
    try:
        plan, site = _setup(msg, context)
    except ConfigError as exc:
        log.error("%s", exc)
        return _refusal(msg, "unknown", public_reason(exc))
    cfg = msg.content[wire.CONFIG]
    run_id = str(cfg.get(wire.RUN_ID, context.run_id))
    rnd = int(cfg.get(wire.GLOBAL_ROUND, cfg.get(wire.SERVER_ROUND, 1)))
    total_rounds = int(cfg.get(wire.TOTAL_ROUNDS, plan.num_server_rounds))
    ft_steps = int(cfg.get(wire.FINE_TUNE_STEPS, plan.fine_tune_steps))
    try:
        task = get_task(plan.task)
        t_load = time.perf_counter()
        data = task.load_data(site, plan)
        t_load = time.perf_counter() - t_load
        model = build_plan_model(plan)
        received = wire.unpack_arrays(msg.content[wire.ARRAYS]).to_torch_state_dict()
        norm = require_norm_params(model, plan.model) if plan.fedbn else []
        start = overlay_local_norm(received, site, run_id) if norm else received
        import_state(model, start)
        dp, eps_after, ledger, cal = None, float("inf"), None, None
        sample_rate = 0.0
        if site.privacy.enabled:
            ledger = PrivacyLedger(site.state_dir, site.name)
            cal = ledger.calibrate(
                run_id,
                plan.dp_target_epsilon,
                site.privacy.delta,
                data.n_train,
                plan.batch_size,
                total_rounds * plan.local_epochs,
                extra_steps=plan.fine_tune_steps,
            )
            # Account what this round really runs: the data may have changed
            # since the run's noise was calibrated.
            sample_rate, steps_per_epoch = poisson_schedule(
                data.n_train, plan.batch_size
            )
            eps_after = check_budget(
                ledger,
                site.name,
                site.privacy.max_epsilon,
                site.privacy.delta,
                plan.dp_target_epsilon,
                cal.noise_multiplier,
                sample_rate,
                ft_steps if fine_tune else steps_per_epoch * plan.local_epochs,
            )
            dp = DPSpec(
                cal.noise_multiplier,
                plan.dp_max_grad_norm,
                get_model_spec(plan.model).grad_sample_mode,
            )
    except REFUSALS as exc:
        log.warning("round %d refused: %s", rnd, exc)
        return _refusal(msg, site.name, public_reason(exc))

    device = select_device(site.device)
    seed = plan.seed * 1_000_003 + rnd * 7919 + zlib.crc32(site.name.encode())
    data.train.set_seed(seed % 2**31)
    _, steps_per_epoch = poisson_schedule(data.n_train, plan.batch_size)
    t_work = time.perf_counter()
    stats = local_train(
        model,
        data.train,
        task.loss(plan),
        epochs=-(-ft_steps // steps_per_epoch) if fine_tune else plan.local_epochs,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        optimizer=plan.optimizer,
        device=device,
        seed=seed % 2**31,
        dp=dp,
        # FedProx: Flower's strategy sends mu; never while fine-tuning
        proximal_mu=0.0 if fine_tune else float(cfg.get(wire.PROXIMAL_MU, 0.0)),
        max_steps=ft_steps if fine_tune else None,
    )
    state = export_state(model)  # refuses NaN/Inf before anything leaves
    kind = "fine-tune" if fine_tune else "train"
    record_timing(site, run_id, rnd, kind, t_load, time.perf_counter() - t_work)
    if ledger is not None and cal is not None:
        ledger.record(
            LedgerEntry(
                run_id,
                rnd,
                cal.noise_multiplier,
                sample_rate,
                stats.steps,
                data.fingerprint,
            )
        )
        eps_after = ledger.epsilon(site.privacy.delta)
    log.info(
        "site %s %s %d: loss %.4f, %d steps, epsilon %.3f",
        site.name,
        "fine-tune after round" if fine_tune else "round",
        rnd,
        stats.loss,
        stats.steps,
        eps_after,
    )
    privacy = {
        wire.DP_ENABLED: int(dp is not None),
        wire.EPSILON: eps_after,
        wire.DELTA: float(site.privacy.delta or 0.0),
        wire.NOISE_MULTIPLIER: dp.noise_multiplier if dp else 0.0,
        wire.REFUSED: 0,
    }
    if fine_tune:
        save_fine_tuned(state, site, run_id)
        values = task.evaluate(model, data, plan, device)
        values.update(privacy)
        values[wire.FINE_TUNED] = 1
        values[wire.NUM_EXAMPLES] = data.n_train
        values[wire.NUM_VAL_CASES] = data.n_val
        return _reply(msg, site.name, MetricRecord(values))
    if norm:
        state = keep_norm_local(state, received, norm, site, run_id)
    metrics = MetricRecord(
        {wire.NUM_EXAMPLES: data.n_train, wire.TRAIN_LOSS: stats.loss, **privacy}
    )
    return _reply(msg, site.name, metrics, ArrayRecord(state))


@app.evaluate()
@governed(site_config_path)
def evaluate(msg: Message, context: Context) -> Message:
    """Dice per KiTS region on the site's validation split (means only)."""
    plan, site = _setup(msg, context)
    task = get_task(plan.task)
    t_load = time.perf_counter()
    data = task.load_data(site, plan)
    t_load = time.perf_counter() - t_load
    model = build_plan_model(plan)
    state = wire.unpack_arrays(msg.content[wire.ARRAYS]).to_torch_state_dict()
    cfg = msg.content[wire.CONFIG]
    run_id = str(cfg.get(wire.RUN_ID, context.run_id))
    if plan.fedbn:  # each site evaluates with its own normalisation layers
        state = overlay_local_norm(state, site, run_id)
    import_state(model, state)
    t_work = time.perf_counter()
    values = task.evaluate(model, data, plan, select_device(site.device))
    rnd = int(cfg.get(wire.GLOBAL_ROUND, cfg.get(wire.SERVER_ROUND, 0)))
    record_timing(site, run_id, rnd, "evaluate", t_load, time.perf_counter() - t_work)
    values[wire.NUM_EXAMPLES] = data.n_train
    values[wire.NUM_VAL_CASES] = data.n_val
    return _reply(msg, site.name, MetricRecord(values))


@app.query()
@governed(site_config_path)
def fingerprint(msg: Message, context: Context) -> Message:
    """Aggregate dataset statistics for the federated preprocessing plan.

    A site with fewer usable cases than the coordinator's minimum sends only
    its refusal: aggregates over very few patients are close to per-case values.
    """
    try:
        plan, site = _setup(msg, context)
        cases = load_site_cases(site)
    except REFUSALS as exc:
        return _refusal(msg, "unknown", public_reason(exc))
    usable = cases.train + cases.validation
    minimum = int(msg.content[wire.CONFIG].get(wire.FINGERPRINT_MIN_CASES, 5))
    if len(usable) < minimum:
        reason = f"site {site.name}: fewer than {minimum} usable cases; no fingerprint"
        return _refusal(msg, site.name, reason)
    stats = site_fingerprint(raw_volumes(usable, cases.label_map))
    return _reply(msg, site.name, MetricRecord(stats))


def public_reason(exc: Exception) -> str:
    """What the coordinator may learn of a refusal: no paths, no case names."""
    if isinstance(exc, BudgetExceeded):
        return str(exc)  # numbers and the site name only
    if isinstance(exc, LedgerError):
        return "privacy ledger damaged or unreadable; the site refuses until repaired"
    if isinstance(exc, SiteDataError):
        return "site data unusable; hospital IT should run `kidneyfl site check`"
    return "site configuration invalid; hospital IT should run `kidneyfl site check`"


def _reply(
    msg: Message, site: str, metrics: MetricRecord, arrays: ArrayRecord | None = None
) -> Message:
    content = RecordDict(
        {wire.METRICS: metrics, wire.SITE: ConfigRecord({wire.SITE_NAME: site})}
    )
    if arrays is not None:
        content[wire.ARRAYS] = wire.pack_arrays(arrays)  # one buffer on the wire
    return Message(content=content, reply_to=msg)


def _refusal(msg: Message, site: str, reason: str) -> Message:
    metrics = MetricRecord({wire.REFUSED: 1, wire.NUM_EXAMPLES: 0})
    content = RecordDict(
        {
            wire.METRICS: metrics,
            wire.SITE: ConfigRecord(
                {wire.SITE_NAME: site, wire.REFUSAL_REASON: reason[:2000]}
            ),
        }
    )
    return Message(content=content, reply_to=msg)
