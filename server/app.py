"""The coordinator's Flower ServerApp.

Validates the plan, finds where the run starts (``server/run_start.py``),
waits for the sites, runs Flower's strategy wrapped by
:class:`server.strategy.wrapper.SiteAwareStrategy` with a checkpoint at every round's
end (``server/round_end.py``), and at the end writes the final model, the
report and a per-site summary. With ``ema-decay`` the final model is the
moving average of the global model, the model every round evaluated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import wire
from common.artifacts import effective_preprocessing
from common.atomic import atomic_write_json
from common.config import Plan, load_plan, privacy_run_id, run_folder
from common.contract import ReplyRules
from common.logs import add_log_file, remove_log_file, setup_logging
from common.scans import SEEN_SCANS_KEY
from server.checkpoint import save_checkpoint
from server.clinical_round import run_clinical
from server.deliver import deliver
from server.finetune import run_fine_tune
from server.liveness import LivenessGrid, SitesGone, wait_for_sites
from server.lr_schedule import learning_rates
from server.preprocessing_round import federated_preprocessing, preprocessing_config
from server.reporting.clinical import clinical_lines
from server.reporting.live_report import LiveReport, live_report
from server.reporting.metrics_log import (
    read_metrics,
    read_start,
    round_line,
    summary_table,
    write_start,
)
from server.reporting.status import ProgressGrid, RunStatus
from server.reporting.survival import survival_lines
from server.round_end import RoundEnd, RunMeta
from server.run_start import StartPoint, start_point
from server.strategy.aggregators import build_strategy, strategy_options
from server.strategy.influence import LocalTraining
from server.strategy.wrapper import SiteAwareStrategy

log = logging.getLogger("kidneyfl.server")
app = ServerApp()


def run_dir_for(plan: Plan, context: Context) -> Path:
    """``<out-dir>/<run-name>``, checked to lie inside out-dir before anything
    is written (``common.config.run_folder``); the run name defaults to
    Flower's run id."""
    return run_folder(plan.out_dir, plan.run_name or f"run-{context.run_id}")


def _site_names(grid: Grid) -> dict[int, str]:
    # Registered names exist in deployment with SuperNode auth; simulation nodes
    # have none, and the sites' declared names are used instead.
    names = {}
    for node in grid.get_nodes():
        name = getattr(node, "name", None)
        if name:
            names[node.node_id] = str(name)
    return names


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the plan (Flower run config)."""
    setup_logging()
    plan = load_plan(context.run_config)
    run_dir = run_dir_for(plan, context)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _run_logs(run_dir, context)
    try:
        _main(grid, plan, run_dir, context)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
        remove_log_file(handler)


def _run_logs(run_dir: Path, context: Context) -> logging.Handler:
    """What a deployed run keeps beside its results, as a simulated one does:
    ``logs/serverapp.log`` (the ServerApp's log, kidneyfl's and Flower's, with
    times) and ``run-config.toml`` (the run config Flower gave the ServerApp;
    a simulation writes its own first, which is kept)."""
    handler = add_log_file(run_dir / "logs" / "serverapp.log")
    logging.getLogger("flwr").addHandler(handler)
    config = run_dir / "run-config.toml"
    if not config.exists():
        import tomli_w

        from common.atomic import atomic_write_text

        values = {str(k): v for k, v in dict(context.run_config).items()}
        atomic_write_text(config, tomli_w.dumps(values))
    return handler


def _main(grid: Grid, plan: Plan, run_dir: Path, context: Context) -> None:
    """The run, once its folder and logs exist (see :func:`main`)."""
    start = start_point(plan, run_dir)
    atomic_write_json(
        run_dir / "plan.json", plan.model_dump(by_alias=True, mode="json")
    )
    if plan.num_server_rounds - start.done <= 0:
        log.info("run %s already completed %d rounds", run_dir.name, start.done)
        return
    status = RunStatus(run_dir, plan.num_server_rounds, start.done)
    reports = LiveReport(run_dir)
    try:
        _federate(grid, plan, run_dir, start, status, reports)
    except Exception as exc:
        msg = _record_stop(exc, run_dir, start.done, status, reports)
        if not isinstance(exc, SitesGone):
            raise
        log.error("%s", msg)
        raise RuntimeError(msg) from None


def _record_stop(
    exc: Exception, run_dir: Path, done: int, status: RunStatus, reports: LiveReport
) -> str:
    """Say in ``status.json`` and the report why the run stopped; the message."""
    reports.wait()
    last = max((int(e["round"]) for e in read_metrics(run_dir)), default=done)
    gone = isinstance(exc, SitesGone)
    msg = (
        f"stopped after round {last}: {exc}. Every completed round is "
        f"checkpointed in {run_dir / 'checkpoints'}; when "
        + ("the sites are back" if gone else "the cause is fixed")
        + ", run again with resume=true"
    )
    state = "stopped" if gone else "failed"
    status.update(state=state, rounds_done=last, phase="", message=msg)
    live_report(run_dir)  # the page stops refreshing and says why
    return msg


def _federate(
    grid: Grid,
    plan: Plan,
    run_dir: Path,
    start: StartPoint,
    status: RunStatus,
    reports: LiveReport,
) -> None:
    grid = _connect(grid, plan, status)
    base_config, prep = _round_config(grid, plan, run_dir)
    meta = RunMeta(
        plan,
        effective_preprocessing(plan, prep),  # what the sites applied
        (prep or {}).get(SEEN_SCANS_KEY),
        start.origin,
    )
    strategy, final = run_rounds(
        grid, plan, run_dir, start, base_config, meta, status, reports
    )
    state = final.to_torch_state_dict()
    save_checkpoint(run_dir / "final", plan.num_server_rounds, state, meta.sidecar())
    if plan.clinical_calibration and plan.task == "segmentation":
        status.update(phase="choosing post-processing and the OOD threshold")
        try:
            extra = run_clinical(
                grid, plan, run_dir, final, base_config, strategy.site_of, start.origin
            )
        except Exception:  # the run's model is saved; this only adds to it
            log.exception("the clinical calibration failed; the final model is kept")
        else:
            sidecar = {**meta.sidecar(), **extra}
            save_checkpoint(run_dir / "final", plan.num_server_rounds, state, sidecar)
    if plan.fine_tune_steps > 0:
        run_fine_tune(grid, plan, run_dir, final, base_config, strategy.site_of)
    _finish(run_dir, plan, status, reports)


def run_rounds(
    grid: Grid,
    plan: Plan,
    run_dir: Path,
    start: StartPoint,
    base_config: dict[str, Any],
    meta: RunMeta,
    status: RunStatus,
    reports: LiveReport,
) -> tuple[SiteAwareStrategy, ArrayRecord]:
    """The run's remaining rounds through Flower's loop, from ``start``.

    Each round ends in a checkpoint (:class:`server.round_end.RoundEnd`) with
    the wrapper's server state and moving average. Returns the wrapper and the
    run's model: the last global model, or its moving average under
    ``ema-decay``.
    """
    round_end = RoundEnd(
        run_dir,
        meta,
        status,
        reports,
        server_state=lambda: strategy.export_state(),
        ema=lambda: strategy.ema_state(),
    )
    strategy = _strategy(grid, plan, start, base_config, round_end)
    initial = ArrayRecord(start.state)
    if start.origin is not None and start.done == 0 and plan.fraction_evaluate > 0:
        status.update(phase="evaluating the starting model")
        rec = strategy.evaluate_start(grid, initial, plan.round_timeout)
        log.info("%s", round_line(write_start(run_dir, rec)))
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=plan.num_server_rounds - start.done,
        timeout=plan.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    last = result.arrays if result.arrays is not None else initial
    return strategy, _final_model(strategy, last)


def _final_model(strategy: SiteAwareStrategy, last: ArrayRecord) -> ArrayRecord:
    """The run's model: the moving average when ``ema-decay`` keeps one, else
    the last global model."""
    ema = strategy.ema_state()
    return last if ema is None else ArrayRecord(ema)


def _connect(grid: Grid, plan: Plan, status: RunStatus) -> Grid:
    """Wait for the sites, then the grid the strategy talks through: with
    liveness deadlines and progress in ``status.json``."""
    status.update(state="waiting-for-sites")
    wait_for_sites(
        grid,
        want=max(plan.expected_sites, plan.min_sites),
        need=plan.min_sites,
        grace=plan.site_wait_timeout,
    )
    live = LivenessGrid(
        ProgressGrid(grid, status), need=plan.min_sites, grace=plan.site_wait_timeout
    )
    status.update(
        state="running",
        sites=len(list(live.get_node_ids())),
        nodes={str(k): v for k, v in _site_names(live).items()},
    )
    return cast(Grid, live)  # a Grid by delegation


def _round_config(
    grid: Grid, plan: Plan, run_dir: Path
) -> tuple[dict[str, Any], dict | None]:
    """The config every message carries, and the federated preprocessing plan
    (None unless the plan asks for a fingerprint round)."""
    base_config: dict[str, Any] = {
        wire.RUN_ID: privacy_run_id(run_dir.name, plan),
        wire.TOTAL_ROUNDS: plan.num_server_rounds,
    }
    if not plan.fingerprint_round:
        return base_config, None
    prep = federated_preprocessing(grid, plan, run_dir, base_config[wire.RUN_ID])
    base_config.update(preprocessing_config(prep))
    return base_config, prep


def _strategy(
    grid: Grid,
    plan: Plan,
    start: StartPoint,
    base_config: dict[str, Any],
    round_end: RoundEnd,
) -> SiteAwareStrategy:
    """The plan's Flower strategy, wrapped, with its server state restored."""
    strategy = SiteAwareStrategy(
        build_strategy(
            plan.strategy,
            plan.min_sites,
            plan.fraction_evaluate,
            plan.central_dp,
            plan.central_dp_noise,
            plan.central_dp_clip,
            num_sites=max(len(list(grid.get_node_ids())), plan.min_sites),
            **strategy_options(plan),
        ),
        min_sites=plan.min_sites,
        round_offset=start.done,
        base_config=base_config,
        on_round_end=round_end,
        site_names=_site_names(grid),
        norm_factor=plan.guard_norm_factor,
        max_site_weight=plan.max_site_weight,
        training=LocalTraining.from_plan(plan),
        ema_decay=plan.ema_decay,
        learning_rates=learning_rates(plan),
        rules=ReplyRules.from_plan(plan),
    )
    strategy.import_state(start.server_state)
    strategy.import_ema(start.ema)
    if start.done:  # a resumed run: earlier unused updates are still told
        strategy.sites.seed_unused(read_metrics(round_end.run_dir))
    return strategy


def _finish(run_dir: Path, plan: Plan, status: RunStatus, reports: LiveReport) -> None:
    """Mark the run finished, log the summary, export the model and the report."""
    entries = read_metrics(run_dir)
    reports.wait()  # the final report below is the last word
    status.update(
        state="finished", rounds_done=plan.num_server_rounds, phase="", message=""
    )
    log.info("\n%s", summary_table(entries, read_start(run_dir)))
    for line in [*clinical_lines(run_dir, entries), *survival_lines(run_dir, entries)]:
        log.info("%s", line)
    log.info("final model: %s", run_dir / "final")
    deliver(run_dir)
