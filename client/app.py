"""The site's Flower ClientApp: ``train``, ``evaluate``, fine-tune, fingerprint.

Only model arrays and aggregate metrics leave through the replies built here,
each listed in docs/privacy.md with what protects it. A site that cannot or
will not answer (no usable data, damaged ledger, privacy budget exhausted, a
release below its own floor, any failure) answers with a refusal: a stable
code and a fixed sentence. The full cause goes to the site's own log only.
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Callable
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

from client.gate import governed, refusal
from client.local_state import keep_norm_local, overlay_local_norm, save_fine_tuned
from client.privacy import (
    BudgetExceeded,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    poisson_schedule,
)
from client.tasks.base import get_task
from client.tasks.segmentation.data import SiteDataError, load_site_cases, raw_volumes
from client.timings import record_timing
from client.train import DPSpec, local_train, select_device
from common import wire
from common.config import ConfigError, Plan, SiteConfig, load_plan, load_site_config
from common.fingerprint import site_fingerprint
from common.logs import log_request, setup_logging
from common.models import get_model_spec
from common.norm_layers import require_norm_params
from common.task_models import build_plan_model
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


Handler = Callable[[Message, Context], Message]


def refusing(handler: Handler) -> Handler:
    """Turn every failure of ``handler`` into a refusal with a code.

    Known refusals (data, ledger, budget, configuration) keep their code; any
    other exception is logged here in full and answered as ``internal-error``.
    Nothing of an exception's text reaches the coordinator, except a budget
    refusal's own epsilon numbers.
    """

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except REFUSALS as exc:
            kind, name = msg.metadata.message_type, _site_name(context)
            log.warning("request %s refused: %s", kind, exc)
            log_request(name, kind, None, "refused", f"{refusal_code(exc)}: {exc}")
            return refusal(msg, name, refusal_code(exc), _public(exc))
        except Exception as exc:
            kind, name = msg.metadata.message_type, _site_name(context)
            log.exception("request %s failed", kind)
            log_request(name, kind, None, "refused", f"internal-error: {exc!r}")
            return refusal(msg, name, "internal-error")

    return wrapper


def _site_name(context: Context) -> str:
    try:
        plan = load_plan(context.run_config)
        return load_site_config(site_config_path(context, plan)).name
    except Exception:  # noqa: BLE001 - the refusal must still go out
        return "unknown"


@app.train()
@governed(site_config_path)
@refusing
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global weights; reply with weights and aggregates."""
    return _train_round(msg, context, fine_tune=False)


@app.train(wire.FINE_TUNE_ACTION)
@governed(site_config_path)
@refusing
def fine_tune(msg: Message, context: Context) -> Message:
    """Fine-tune the final global model locally; it stays at the site.

    The reply carries only the fine-tuned model's validation metrics (and the
    privacy spent): no arrays, nothing to aggregate.
    """
    return _train_round(msg, context, fine_tune=True)


def _train_round(msg: Message, context: Context, fine_tune: bool) -> Message:
    plan, site = _setup(msg, context)
    cfg = msg.content[wire.CONFIG]
    run_id = str(cfg.get(wire.RUN_ID, context.run_id))
    rnd = _round(cfg, default=1)
    total_rounds = int(cfg.get(wire.TOTAL_ROUNDS, plan.num_server_rounds))
    ft_steps = int(cfg.get(wire.FINE_TUNE_STEPS, plan.fine_tune_steps))
    task = get_task(plan.task)
    t_load = time.perf_counter()
    data = task.load_data(site, plan)
    t_load = time.perf_counter() - t_load
    model = build_plan_model(plan)
    received = wire.unpack_arrays(msg.content[wire.ARRAYS]).to_torch_state_dict()
    norm = require_norm_params(model, plan.model) if plan.fedbn else []
    start = overlay_local_norm(received, site, run_id) if norm else received
    import_state(model, start)
    _, steps_per_epoch = poisson_schedule(data.n_train, plan.batch_size)
    steps = ft_steps if fine_tune else steps_per_epoch * plan.local_epochs
    dp, eps_after = _spend(site, plan, run_id, rnd, data, total_rounds, steps)

    # Augmentation and crops may stay reproducible (they are not the DP
    # mechanism); the noise and the Poisson sampling draw from the site's own
    # entropy inside client.privacy.make_private.
    seed = (plan.seed * 1_000_003 + rnd * 7919 + zlib.crc32(site.name.encode())) % 2**31
    data.train.set_seed(seed)
    t_work = time.perf_counter()
    stats = local_train(
        model,
        data.train,
        task.loss(plan),
        epochs=-(-steps // steps_per_epoch),
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        optimizer=plan.optimizer,
        device=select_device(site.device),
        seed=seed,
        dp=dp,
        # FedProx: Flower's strategy sends mu; never while fine-tuning
        proximal_mu=0.0 if fine_tune else float(cfg.get(wire.PROXIMAL_MU, 0.0)),
        max_steps=steps,
        multiplicity=plan.augmentation_multiplicity,
    )
    if dp is not None and stats.steps != steps:
        log.warning("ran %d DP steps of the %d accounted", stats.steps, steps)
    state = export_state(model)  # refuses NaN/Inf before anything leaves
    kind = "fine-tune" if fine_tune else "train"
    record_timing(site, run_id, rnd, kind, t_load, time.perf_counter() - t_work)
    log.info(
        "site %s %s %d: loss %.4f, %d steps, epsilon %.3f",
        site.name,
        "fine-tune after round" if fine_tune else "round",
        rnd,
        stats.loss,
        stats.steps,
        eps_after,
    )
    log_request(
        site.name,
        kind,
        rnd,
        "trained",
        f"{stats.steps} steps, epsilon {eps_after:.2f}"
        + ("" if dp is not None else f", loss {stats.loss:.3f}"),
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
        values = _validation_metrics(task, model, data, plan, site, cfg)
        values.update(privacy)
        values[wire.FINE_TUNED] = 1
        values[wire.NUM_EXAMPLES] = data.n_train
        return _reply(msg, site.name, MetricRecord(values))
    if norm:
        state = keep_norm_local(state, received, norm, site, run_id)
    metrics = {wire.NUM_EXAMPLES: data.n_train, **privacy}
    if dp is None:  # the mean loss on training patients has no DP protection
        metrics[wire.TRAIN_LOSS] = stats.loss
    return _reply(msg, site.name, MetricRecord(metrics), ArrayRecord(state))


def _spend(
    site: SiteConfig,
    plan: Plan,
    run_id: str,
    rnd: int,
    data,
    total_rounds: int,
    steps: int,
) -> tuple[DPSpec | None, float]:
    """Calibrate the run's noise and spend this round's budget, before training.

    The budget check and the ledger entry are one locked step: a second
    training at this site (another run, a retried message) sees the spend and
    cannot also pass the ceiling. Returns the DP settings (None without DP) and
    the cumulative epsilon after the round.
    """
    if not site.privacy.enabled:
        return None, float("inf")
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
    # Account what this round really runs: the data may have changed since the
    # run's noise was calibrated.
    sample_rate, _ = poisson_schedule(data.n_train, plan.batch_size)
    entry = LedgerEntry(
        run_id, rnd, cal.noise_multiplier, sample_rate, steps, data.fingerprint
    )
    eps_after = ledger.spend(
        entry, site.privacy.max_epsilon, site.privacy.delta, plan.dp_target_epsilon
    )
    spec = DPSpec(
        cal.noise_multiplier,
        plan.dp_max_grad_norm,
        get_model_spec(plan.model).grad_sample_mode,
    )
    return spec, eps_after


def _round(cfg, default: int) -> int:
    return int(cfg.get(wire.GLOBAL_ROUND, cfg.get(wire.SERVER_ROUND, default)))


def aggregate_floor(site: SiteConfig, requested: int = 0) -> int:
    """The fewest patients a released aggregate may describe at this site.

    The site's own ``privacy.min_cases_for_aggregates``; the coordinator may ask
    for more, never for less.
    """
    return max(site.privacy.min_cases_for_aggregates, int(requested))


def _validation_metrics(task, model, data, plan: Plan, site: SiteConfig, cfg) -> dict:
    """The task's validation metrics, or only a withheld marker.

    Validation metrics are means over validation patients, not covered by DP:
    the site releases them only by its own choice and above its floor.
    """
    values: dict = {wire.NUM_VAL_CASES: data.n_val}
    floor = aggregate_floor(site, int(cfg.get(wire.MIN_CASES_FOR_AGGREGATES, 0)))
    if not site.privacy.share_validation_metrics or data.n_val < floor:
        log.info(
            "validation metrics withheld (share_validation_metrics=%s, %d "
            "validation cases, floor %d)",
            site.privacy.share_validation_metrics,
            data.n_val,
            floor,
        )
        values[wire.METRICS_WITHHELD] = 1
        return values
    values.update(task.evaluate(model, data, plan, select_device(site.device)))
    return values


@app.evaluate()
@governed(site_config_path)
@refusing
def evaluate(msg: Message, context: Context) -> Message:
    """Dice per KiTS region on the site's validation split (means only)."""
    plan, site = _setup(msg, context)
    task = get_task(plan.task)
    cfg = msg.content[wire.CONFIG]
    run_id = str(cfg.get(wire.RUN_ID, context.run_id))
    t_load = time.perf_counter()
    data = task.load_data(site, plan)
    t_load = time.perf_counter() - t_load
    model = build_plan_model(plan)
    state = wire.unpack_arrays(msg.content[wire.ARRAYS]).to_torch_state_dict()
    if plan.fedbn:  # each site evaluates with its own normalisation layers
        state = overlay_local_norm(state, site, run_id)
    import_state(model, state)
    t_work = time.perf_counter()
    values = _validation_metrics(task, model, data, plan, site, cfg)
    rnd = _round(cfg, default=0)
    record_timing(site, run_id, rnd, "evaluate", t_load, time.perf_counter() - t_work)
    values[wire.NUM_EXAMPLES] = data.n_train
    shared = "metrics withheld" if wire.METRICS_WITHHELD in values else "means sent"
    log_request(
        site.name,
        "evaluate",
        rnd,
        "evaluated",
        f"{data.n_val} validation cases, {shared}",
    )
    return _reply(msg, site.name, MetricRecord(values))


@app.query()
@governed(site_config_path)
@refusing
def fingerprint(msg: Message, context: Context) -> Message:
    """Aggregate dataset statistics for the federated preprocessing plan.

    Sent only if the site shares its fingerprint (``privacy.share_fingerprint``)
    and has at least its floor of usable patients (the coordinator's minimum
    can raise the floor, never lower it); otherwise a refusal.
    """
    plan, site = _setup(msg, context)
    if not site.privacy.share_fingerprint:
        log_request(site.name, "query", None, "refused", "not-shared (site choice)")
        return refusal(msg, site.name, "not-shared")
    cases = load_site_cases(site)
    usable = cases.train + cases.validation
    requested = int(msg.content[wire.CONFIG].get(wire.FINGERPRINT_MIN_CASES, 5))
    if len(usable) < aggregate_floor(site, requested):
        log_request(site.name, "query", None, "refused", "too-few-cases")
        return refusal(msg, site.name, "too-few-cases")
    stats = site_fingerprint(raw_volumes(usable, cases.label_map))
    log_request(
        site.name, "query", None, "sent its fingerprint", f"{len(usable)} cases"
    )
    return _reply(msg, site.name, MetricRecord(stats))


def refusal_code(exc: Exception) -> str:
    """The stable code the coordinator sees for a refusal."""
    if isinstance(exc, BudgetExceeded):
        return "budget-exceeded"
    if isinstance(exc, LedgerError):
        return "ledger-damaged"
    if isinstance(exc, SiteDataError):
        return "data-unusable"
    if isinstance(exc, ConfigError):
        return "config-invalid"
    return "internal-error"


def _public(exc: Exception) -> str:
    """The sentence beside the code: fixed, except a budget refusal's numbers."""
    if isinstance(exc, BudgetExceeded):
        return str(exc)  # the site's name and its own epsilon numbers only
    return wire.REFUSAL_CODES[refusal_code(exc)]


def public_reason(exc: Exception) -> str:
    """What the coordinator may learn of a refusal: no paths, no case names."""
    return _public(exc)


def _reply(
    msg: Message, site: str, metrics: MetricRecord, arrays: ArrayRecord | None = None
) -> Message:
    content = RecordDict(
        {wire.METRICS: metrics, wire.SITE: ConfigRecord({wire.SITE_NAME: site})}
    )
    if arrays is not None:
        content[wire.ARRAYS] = wire.pack_arrays(arrays)  # one buffer on the wire
    return Message(content=content, reply_to=msg)
