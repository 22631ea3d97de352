"""``kidneyfl report`` and ``kidneyfl status`` never import Flower.

The consortium reads a run's records on any machine (a laptop with the run
folder copied over); the report path is plain Python, numpy and matplotlib.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Renders the report of a small fake run through the report and status
# commands, then says which of the report's modules pulled Flower in.
SCRIPT = """
import argparse, json, sys
from pathlib import Path

import server.cli, server.deliver, server.reporting.plots, server.reporting.metrics_log
import server.reporting.html, server.reporting.round_record, server.reporting.status
from server.reporting.metrics_log import append_metrics, round_entry
from server.reporting.round_record import RoundRecord

run = Path(sys.argv[1])
for r in (1, 2):
    rec = RoundRecord(round=r, aggregated=True)
    for i, site in enumerate(("a", "b")):
        rec.train[site] = {"num-examples": 6.0, "epsilon": 1.0 * r, "dp-enabled": 1.0}
        rec.evaluate[site] = {"dice-kidney": 0.3 * r + 0.1 * i, "num-val-cases": 2.0}
    rec.refused["c"] = "over budget"
    append_metrics(run, round_entry(rec))
(run / "plan.json").write_text(json.dumps({"model": "unet-tiny"}))
(run / "status.json").write_text(json.dumps({"state": "finished"}))
parser = argparse.ArgumentParser()
server.cli.register(parser.add_subparsers())
for argv in (["report", str(run), "--no-samples"], ["status", str(run)]):
    args = parser.parse_args(argv)
    assert args.func(args) == 0
assert (run / "report.html").is_file()
print("FLOWER:", sorted(m for m in sys.modules if m.split(".")[0] == "flwr"))
"""


def test_report_and_status_render_without_importing_flower(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FLOWER: []" in out.stdout, out.stdout[-2000:]
    page = (run / "report.html").read_text()
    assert "dice-kidney" in page and "over budget" in page
