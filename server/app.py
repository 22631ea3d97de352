"""The coordinator's Flower ServerApp.

Validates the plan, resumes from the run's last checkpoint when asked, runs
Flower's strategy wrapped by :class:`server.strategy.SiteAwareStrategy`, and at
the end writes the final model and a per-site summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from common import wire
from common.artifacts import PREPROCESSING_KEY, effective_preprocessing
from common.atomic import atomic_write_json
from common.config import Plan, load_plan
from common.fingerprint import combine
from common.logs import setup_logging
from common.norm_layers import require_norm_params
from common.scans import SEEN_SCANS_KEY, seen_scans
from common.task_models import build_plan_model
from common.weights import import_state
from server.aggregators import strategy_options
from server.checkpoint import (
    INITIAL_KEY,
    CheckpointError,
    load_checkpoint,
    load_initial,
    load_server_state,
    save_checkpoint,
)
from server.deliver import deliver
from server.finetune import run_fine_tune
from server.liveness import LivenessGrid, SitesGone, wait_for_sites
from server.recovery import reconcile_metrics
from server.report import (
    append_metrics,
    read_metrics,
    round_entry,
    round_line,
    summary_table,
)
from server.report_html import write_report
from server.status import ProgressGrid, RunStatus
from server.strategy import (
    LocalTraining,
    RoundRecord,
    SiteAwareStrategy,
    build_strategy,
)

log = logging.getLogger("kidneyfl.server")
app = ServerApp()


def run_dir_for(plan: Plan, context: Context) -> Path:
    """``<out-dir>/<run-name>``; the run name defaults to Flower's run id."""
    name = plan.run_name or f"run-{context.run_id}"
    return Path(plan.out_dir).expanduser().resolve() / name


def _site_names(grid: Grid) -> dict[int, str]:
    # Registered names exist in deployment with SuperNode auth; simulation nodes
    # have none, and the sites' declared names are used instead.
    names = {}
    for node in grid.get_nodes():
        name = getattr(node, "name", None)
        if name:
            names[node.node_id] = str(name)
    return names


def _state_sha(state: dict) -> str:
    # Identifies the global weights exactly (logged on resume, tested).
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def live_report(run_dir: Path) -> None:
    """Rewrite ``report.html`` from what the run holds now; never fails the run."""
    try:
        write_report(run_dir)
    except Exception:  # noqa: BLE001 - the report is a view; the round is saved
        log.warning("could not rewrite the live report", exc_info=True)


class LiveReport:
    """Rewrites the report beside the round loop, so plotting never delays a
    round; a request while one is being written makes one more pass after it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._busy = self._again = False
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Rewrite the report soon (in a thread)."""
        with self._lock:
            if self._busy:
                self._again = True
                return
            self._busy = True
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            live_report(self.run_dir)
            with self._lock:
                if not self._again:
                    self._busy = False
                    return
                self._again = False

    def wait(self) -> None:
        """Block until no rewrite is in progress."""
        if self._thread is not None:
            self._thread.join()


def federated_preprocessing(grid: Grid, plan: Plan, run_dir: Path) -> dict:
    """Ask every site for its dataset fingerprint and combine them; saved as
    ``preprocessing.json`` beside the run (and reused when the run resumes)."""
    path = run_dir / "preprocessing.json"
    if path.exists():
        return json.loads(path.read_text())
    config = ConfigRecord({wire.FINGERPRINT_MIN_CASES: plan.fingerprint_min_cases})
    messages = [
        Message(
            content=RecordDict({wire.CONFIG: config}),
            message_type=MessageType.QUERY,
            dst_node_id=node,
        )
        for node in grid.get_node_ids()
    ]
    prints, refused = {}, {}
    for reply in grid.send_and_receive(messages, timeout=plan.round_timeout):
        if reply.has_error():
            refused[f"node-{reply.metadata.src_node_id}"] = str(reply.error.reason)
            continue
        site = reply.content[wire.SITE]
        name = str(site.get(wire.SITE_NAME, f"node-{reply.metadata.src_node_id}"))
        metrics = reply.content[wire.METRICS]
        if metrics.get(wire.REFUSED, 0):
            refused[name] = str(site.get(wire.REFUSAL_REASON, "refused"))
        else:
            prints[name] = dict(metrics)
    if len(prints) < plan.min_sites:
        raise RuntimeError(
            f"fingerprint round: {len(prints)} site(s) answered, {plan.min_sites} "
            f"needed; refusals: {refused}"
        )
    prep = combine(prints, max_patch=plan.patch_size)  # bounded compute
    prep["refused"] = refused
    prep[SEEN_SCANS_KEY] = seen_scans(prints)  # for predict's input check
    atomic_write_json(path, prep)
    log.info("federated preprocessing plan: %s", prep)
    return prep


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the plan (Flower run config)."""
    setup_logging()
    plan = load_plan(context.run_config)
    run_dir = run_dir_for(plan, context)
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    model = build_plan_model(plan)
    initial = ArrayRecord(model.state_dict())
    if plan.fedbn:
        require_norm_params(model, plan.model)
    done, server_state, origin = 0, {}, None
    if plan.initial_checkpoint:
        state, origin = load_initial(
            Path(plan.initial_checkpoint), plan.task, plan.model
        )
        import_state(model, state)  # every key and shape, or an error
        initial = ArrayRecord(model.state_dict())
        log.info(
            "starting from %s (pretrained on %s, licence %s, sha256 %s)",
            origin["path"],
            origin["dataset"],
            origin["licence"],
            origin["sha256"][:16],
        )
    if plan.resume and (ckpt_dir / "latest.json").exists():
        state, meta = load_checkpoint(ckpt_dir, plan.fingerprint())
        initial, done = ArrayRecord(state), int(meta["round"])
        server_state = load_server_state(ckpt_dir, meta)
        reconcile_metrics(run_dir, ckpt_dir, done)
        log.info(
            "resumed %s from round %d (global weights sha256 %s)",
            run_dir.name,
            done,
            _state_sha(state),
        )
    elif (ckpt_dir / "latest.json").exists():
        raise CheckpointError(
            f"{run_dir} already holds checkpoints; pass resume=true to continue it or "
            "choose another run-name (nothing was overwritten)"
        )
    remaining = plan.num_server_rounds - done
    atomic_write_json(
        run_dir / "plan.json", plan.model_dump(by_alias=True, mode="json")
    )
    if remaining <= 0:
        log.info("run %s already completed %d rounds", run_dir.name, done)
        return
    status = RunStatus(run_dir, plan.num_server_rounds, done)
    reports = LiveReport(run_dir)
    try:
        _federate(
            grid, plan, run_dir, initial, done, server_state, status, reports, origin
        )
    except Exception as exc:
        reports.wait()
        last = max((int(e["round"]) for e in read_metrics(run_dir)), default=done)
        gone = isinstance(exc, SitesGone)
        msg = (
            f"stopped after round {last}: {exc}. Every completed round is "
            f"checkpointed in {ckpt_dir}; when "
            + ("the sites are back" if gone else "the cause is fixed")
            + ", run again with resume=true"
        )
        state = "stopped" if gone else "failed"
        status.update(state=state, rounds_done=last, phase="", message=msg)
        live_report(run_dir)  # the page stops refreshing and says why
        if not gone:
            raise
        log.error("%s", msg)
        raise RuntimeError(msg) from None


def _federate(
    grid: Grid,
    plan: Plan,
    run_dir: Path,
    initial: ArrayRecord,
    done: int,
    server_state: dict,
    status: RunStatus,
    reports: LiveReport,
    origin: dict | None = None,
) -> None:
    ckpt_dir = run_dir / "checkpoints"
    remaining = plan.num_server_rounds - done
    status.update(state="waiting-for-sites")
    wait_for_sites(
        grid,
        want=max(plan.expected_sites, plan.min_sites),
        need=plan.min_sites,
        grace=plan.site_wait_timeout,
    )
    grid = LivenessGrid(
        ProgressGrid(grid, status), need=plan.min_sites, grace=plan.site_wait_timeout
    )
    status.update(
        state="running",
        sites=len(list(grid.get_node_ids())),
        nodes={str(k): v for k, v in _site_names(grid).items()},
    )

    base_config: dict = {
        wire.RUN_ID: run_dir.name,
        wire.TOTAL_ROUNDS: plan.num_server_rounds,
    }
    prep = None
    if plan.fingerprint_round:
        prep = federated_preprocessing(grid, plan, run_dir)
        base_config[wire.PREP_SPACING] = [float(v) for v in prep["spacing-mm"]]
        base_config[wire.PREP_WINDOW] = [float(v) for v in prep["hu-window"]]
        base_config[wire.PREP_PATCH] = [int(v) for v in prep["patch-size"]]
        base_config[wire.PREP_MEAN] = float(prep["foreground-mean"])
        base_config[wire.PREP_STD] = float(prep["foreground-std"])
    # Checkpoints carry the preprocessing the sites applied (self-describing).
    prep_meta = effective_preprocessing(plan, prep)
    seen = (prep or {}).get(SEEN_SCANS_KEY)

    def on_round_end(rec: RoundRecord, arrays: ArrayRecord) -> None:
        entry = round_entry(rec)
        entry["time"] = time.time()
        state = arrays.to_torch_state_dict()
        entry["global_sha256"] = _state_sha(state)
        sidecar = {
            "entry": entry,
            "plan": plan.model_dump(by_alias=True, mode="json"),
            "plan_fingerprint": json.loads(json.dumps(plan.fingerprint())),
            "model": plan.model,
            PREPROCESSING_KEY: prep_meta,
            SEEN_SCANS_KEY: seen,
            "metrics": entry["weighted"],
            "epsilon_per_site": entry["epsilon"],
            "max_epsilon": max(
                (e for e in entry["epsilon"].values() if e is not None), default=None
            ),
            "sites": sorted(set(rec.train) | set(rec.evaluate)),
            INITIAL_KEY: origin,
        }
        save_checkpoint(
            ckpt_dir,
            rec.round,
            state,
            sidecar,
            server_state=strategy.export_state(),
        )
        append_metrics(run_dir, entry)
        status.round_done(rec.round)
        log.info("%s", round_line(entry))
        reports.request()

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
        round_offset=done,
        base_config=base_config,
        on_round_end=on_round_end,
        site_names=_site_names(grid),
        norm_factor=plan.guard_norm_factor,
        max_site_weight=plan.max_site_weight,
        training=LocalTraining.from_plan(plan),
    )
    strategy.import_state(server_state)
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=remaining,
        timeout=plan.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    final = result.arrays if result.arrays is not None else initial
    save_checkpoint(
        run_dir / "final",
        plan.num_server_rounds,
        final.to_torch_state_dict(),
        {
            "plan": plan.model_dump(by_alias=True, mode="json"),
            "plan_fingerprint": json.loads(json.dumps(plan.fingerprint())),
            "model": plan.model,
            PREPROCESSING_KEY: prep_meta,
            SEEN_SCANS_KEY: seen,
            INITIAL_KEY: origin,
        },
    )
    if plan.fine_tune_steps > 0:
        run_fine_tune(grid, plan, run_dir, final, base_config, strategy.site_of)
    entries = read_metrics(run_dir)
    reports.wait()  # the final report below is the last word
    status.update(
        state="finished", rounds_done=plan.num_server_rounds, phase="", message=""
    )
    log.info("\n%s", summary_table(entries))
    log.info("final model: %s", run_dir / "final")
    deliver(run_dir)
