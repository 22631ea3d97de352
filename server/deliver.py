"""What the consortium gets back at the end of a run, in one call.

``deliver`` exports the final model (TorchScript + preprocessing JSON) and
writes the report (HTML, PNGs, TensorBoard events). Training is finished and
the final checkpoint saved before this runs, so a failure here is logged and
never loses the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from common.artifacts import load_model_dir
from common.config import load_plan
from common.tasks import build_plan_model
from common.weights import import_state
from server.export import export_model
from server.report import read_metrics
from server.report_html import write_report
from server.tensorboard_log import write_events

log = logging.getLogger("kidneyfl.server")


def sample_slices(run_dir: Path) -> tuple[list, list[str]]:
    """Phantom-only sample slices of the final model, in local simulation.

    The only place the coordinator side touches site code, and only for the
    simulated sites of ``sim-site-configs``: ``client.samples`` renders a site
    solely when its YAML and data folder both say phantom. A deployment has no
    site YAMLs here, so nothing is imported or read.
    """
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file() or not (run_dir / "final" / "latest.json").is_file():
        return [], []
    plan = load_plan(json.loads(plan_path.read_text()))
    if not plan.site_config_paths or plan.task != "segmentation":
        return [], []
    from client.samples import phantom_samples  # simulation only; see docstring

    state, _, eff_plan = load_model_dir(run_dir / "final")
    model = build_plan_model(eff_plan)
    import_state(model, state)
    return phantom_samples(plan.site_config_paths, model, eff_plan)


def report(run_dir: Path, samples: bool = True) -> Path:
    """HTML report, PNGs and TensorBoard events of a run; returns the HTML."""
    run_dir = Path(run_dir)
    slices, skipped = [], []
    if samples:
        try:
            slices, skipped = sample_slices(run_dir)
        except Exception:  # noqa: BLE001 - a missing phantom must not stop the report
            log.warning("no sample slices", exc_info=True)
    write_events(run_dir, read_metrics(run_dir))
    return write_report(run_dir, slices, skipped)


def deliver(run_dir: Path) -> None:
    """Export the final model and write the report; errors are logged only."""
    run_dir = Path(run_dir)
    try:
        export_model(run_dir / "final")
    except Exception:  # noqa: BLE001 - the checkpoint is saved; export is extra
        log.exception("exporting the final model failed; `kidneyfl export` retries")
    try:
        report(run_dir)
    except Exception:  # noqa: BLE001
        log.exception("writing the report failed; `kidneyfl report` retries")
