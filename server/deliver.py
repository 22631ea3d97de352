"""What the consortium gets back at the end of a run, in one call.

``deliver`` exports the final model (TorchScript + preprocessing JSON) and
writes the report (HTML, PNGs, TensorBoard events). Training is finished and
the final checkpoint saved before this runs, so a failure here is logged and
never loses the run. The report is drawn within a time limit
(``live_report.draw_bounded``): one that takes longer is not waited for, and
``status.json`` and the log say so and how to redraw it (``kidneyfl report``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from server.export import export_model
from server.reporting.html import write_report
from server.reporting.live_report import REPORT_TIME_LIMIT_S, draw_bounded
from server.reporting.metrics_log import read_metrics
from server.reporting.status import note_report
from server.reporting.tensorboard_log import write_events

log = logging.getLogger("kidneyfl.server")


# What a simulation passes in to draw sample slices: run folder -> (slices,
# names of the sites it skipped). The coordinator never makes them itself.
SamplesFn = Callable[[Path], tuple[list, list[str]]]


def report(run_dir: Path, samples: SamplesFn | None = None) -> Path:
    """HTML report, PNGs and TensorBoard events of a run; returns the HTML.

    ``samples`` draws the sample slices of a simulated run (``sim.samples``);
    without it, as in every deployment, the report has none.
    """
    run_dir = Path(run_dir)
    slices, skipped = [], []
    if samples is not None:
        try:
            slices, skipped = samples(run_dir)
        except Exception:  # noqa: BLE001 - a missing phantom must not stop the report
            log.warning("no sample slices", exc_info=True)
    write_events(run_dir, read_metrics(run_dir))
    out = write_report(run_dir, slices, skipped)
    note_report(run_dir, None)  # drawn: status.json no longer says otherwise
    return out


def deliver(run_dir: Path, time_limit_s: float = REPORT_TIME_LIMIT_S) -> None:
    """Export the final model and write the report within ``time_limit_s``;
    errors are logged (and a report not drawn noted in ``status.json``) only."""
    run_dir = Path(run_dir)
    try:
        export_model(run_dir / "final")
    except Exception:  # noqa: BLE001 - the checkpoint is saved; export is extra
        log.exception("exporting the final model failed; `kidneyfl export` retries")
    draw_bounded(run_dir, lambda: report(run_dir), time_limit_s)
