"""Commands the consortium runs on a run's records: ``report``, ``status``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.deliver import SamplesFn


def _status(args: argparse.Namespace) -> int:
    from server.reporting.metrics_log import (
        read_metrics,
        read_start,
        round_lines,
        summary_table,
    )
    from server.reporting.status import progress_text, read_status, status_line

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"{run_dir}: no such run folder; runs are under runs/<run-name>"
        )
    status, entries = read_status(run_dir), read_metrics(run_dir)
    print(f"run {run_dir.name}: {status_line(status)}")
    start = read_start(run_dir)
    for line in round_lines(entries, start):
        print(line)
    progress = progress_text(status)
    if progress:
        print(progress)
    if entries and status.get("state") not in ("running", "waiting-for-sites"):
        print()
        print(summary_table(entries, start))
    if (run_dir / "report.html").is_file():
        print(f"\nreport: {run_dir / 'report.html'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from server.deliver import report
    from server.reporting.metrics_log import (
        read_metrics,
        read_start,
        round_lines,
        summary_table,
    )

    entries = read_metrics(Path(args.run_dir))
    if not entries:
        raise FileNotFoundError(f"{args.run_dir}: no metrics.jsonl with rounds")
    start = read_start(Path(args.run_dir))
    for line in round_lines(entries, start):
        print(line)
    print()
    print(summary_table(entries, start))
    samples = None if args.no_samples else args.samples
    print(f"\nreport: {report(Path(args.run_dir), samples=samples)}")
    return 0


def register(sub: argparse._SubParsersAction, samples: SamplesFn | None = None) -> None:
    """Add ``report`` and ``status``.

    ``samples`` draws a simulated run's sample slices (``sim.samples``); the
    top-level ``cli`` passes it in, so the coordinator never imports ``sim``.
    """
    r = sub.add_parser(
        "report",
        help="print a run's metrics and write report.html, plots, TensorBoard events",
        allow_abbrev=False,
        epilog="example: kidneyfl report runs/sim-20260101-120000",
    )
    r.add_argument("run_dir")
    r.add_argument(
        "--no-samples",
        action="store_true",
        help="skip the sample slices (phantom sites only) in report.html",
    )
    r.set_defaults(func=_report, samples=samples)

    st = sub.add_parser(
        "status",
        help="where a run is: state, round lines, the running round, the summary",
        allow_abbrev=False,
        epilog="example: kidneyfl status runs/sim-20260101-120000  (while it runs, "
        "or after)",
    )
    st.add_argument("run_dir")
    st.set_defaults(func=_status)
