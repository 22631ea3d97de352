"""Deployment round latency on 127.0.0.1: SuperLink + 2 SuperNodes, small model.

Starts a real ``flower-superlink`` and two ``flower-supernode`` processes (the
runbook's commands, via tests/deployment.py; TLS and node auth on), runs R
rounds of the smallest plan, and reports seconds per round (time between
consecutive round checkpoints) and where a round goes:

- ``clientapp_import_s``: a fresh Python process importing kidneyfl's ClientApp
  (Flower starts one ``flwr-clientapp`` process per message: train and evaluate
  per site per round);
- ``train_s`` / ``evaluate_s``: the ClientApp's own work, from the site logs;
- the rest is Flower's polling (SuperNodes poll the SuperLink every few
  seconds when idle, the ServerApp's ``send_and_receive`` polls every 3 s) and
  message transfer.

    .venv/bin/python benchmarks/deploy_latency.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLAN = {
    "spacing-mm": "6,6,8",
    "patch-size": "32,32,16",
    "batch-size": 2,
    "local-epochs": 1,
    "min-sites": 2,
    "expected-sites": 2,
    "dp-target-epsilon": 30.0,
}


def import_time(repeats: int = 3) -> float:
    """Median seconds for a new interpreter to import the ClientApp."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import client.app"], cwd=ROOT, check=True
        )
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(rounds: int) -> dict:
    """Seconds per round of a 2-site deployment."""
    from tests.deployment import Deployment, metrics, wait_for

    with tempfile.TemporaryDirectory() as d:
        dep = Deployment(Path(d) / "deploy")
        try:
            dep.start_superlink()
            names = ["hospital-a", "hospital-b"]
            for i, name in enumerate(names):
                dep.add_site(name, cases=5, seed=i)
                dep.register(name)
            for name in names:
                dep.start_site(name)
            dep.wait_online(names)
            out = Path(d) / "runs"
            t0 = time.perf_counter()
            run = dep.submit("latency", out, {**PLAN, "num-server-rounds": rounds})
            wait_for(lambda: run.popen.poll() is not None, 1800, "run end", 1)
            wall = time.perf_counter() - t0
            entries = metrics(out / "latency")
        finally:
            dep.stop_all()
    times = [e["time"] for e in entries]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "rounds": len(entries),
        "submit_to_end_s": wall,
        "round_gaps_s": gaps,
        "per_round_s": sum(gaps) / len(gaps) if gaps else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    imp = import_time()
    row = {**measure(args.rounds), "clientapp_import_s": imp}
    print(
        f"deployment, 2 sites: {row['per_round_s']:.1f} s per round (target 5); "
        f"a fresh ClientApp process imports in {imp:.1f} s and each round starts "
        f"2 per site; submit to end {row['submit_to_end_s']:.1f} s for "
        f"{row['rounds']} rounds"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
