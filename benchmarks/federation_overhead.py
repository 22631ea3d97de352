"""Federation overhead: one site through kidneyfl's simulation vs a plain loop.

Both sides train the same model on the same phantom site for R rounds x E
local epochs with the same batches (no DP, no evaluation, so only federation
machinery differs):

- ``plain``: ``client.train.local_train`` called R times in one process, the
  model carried over (what a researcher would write without a framework);
- ``kidneyfl``: ``kidneyfl simulate`` of that one site (SuperLink, Flower's
  simulation engine, ClientApp, serialisation, checkpoint every round).

Prints the wall-time ratio, and the fixed per-round cost: the mean time
between consecutive rounds' checkpoints in the simulation minus the plain
loop's time per round. Start-up (SuperLink, Ray, first imports) is reported
separately because it is paid once per run, not per round.

    .venv/bin/python benchmarks/federation_overhead.py [--rounds 4 --cases 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLAN = {
    "spacing-mm": "6,6,8",
    "patch-size": "32,32,16",
    "batch-size": 8,
    "learning-rate": 0.01,
    "min-sites": 1,
    "fraction-evaluate": 0.0,
}


def _site(tmp: Path, cases: int) -> Path:
    from tests.conftest import write_site_yaml

    return write_site_yaml(
        tmp, "bench-site", cases=cases, privacy={"enabled": False}, seed=3
    )


def plain(site_yaml: Path, rounds: int, epochs: int) -> float:
    """Seconds for rounds x epochs of local training in one process."""
    import torch

    from client.tasks.base import get_task
    from client.train import local_train
    from common.config import load_plan, load_site_config
    from common.task_models import build_plan_model
    from sim.runner import default_plan

    plan = load_plan({**default_plan(), **PLAN, "local-epochs": epochs})
    site = load_site_config(site_yaml)
    task = get_task(plan.task)
    data = task.load_data(site, plan)  # warm the site cache first, as sims do
    model = build_plan_model(plan)
    t0 = time.perf_counter()
    for r in range(rounds):
        local_train(
            model,
            data.train,
            task.loss(plan),
            epochs=epochs,
            batch_size=plan.batch_size,
            learning_rate=plan.learning_rate,
            optimizer=plan.optimizer,
            device=torch.device("cpu"),
            seed=plan.seed + r,
        )
    return time.perf_counter() - t0


def federated(site_yaml: Path, rounds: int, epochs: int, tmp: Path) -> dict:
    """Wall time of the simulation and the time between round checkpoints."""
    from sim.runner import simulate

    t0 = time.perf_counter()
    run = simulate(
        [site_yaml],
        "bench",
        out_dir=tmp / "runs",
        overrides={**PLAN, "num-server-rounds": rounds, "local-epochs": epochs},
        flwr_home=tmp / "flwr-home",
        stream=False,
    )
    wall = time.perf_counter() - t0
    times = [
        json.loads(line)["time"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"wall": wall, "round_gaps": gaps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        site = _site(tmp, args.cases)
        t_plain = plain(site, args.rounds, args.epochs)
        fed = federated(site, args.rounds, args.epochs, tmp)
    per_round_plain = t_plain / args.rounds
    gaps = fed["round_gaps"]
    per_round_fed = sum(gaps) / len(gaps) if gaps else float("nan")
    row = {
        "rounds": args.rounds,
        "epochs": args.epochs,
        "cases": args.cases,
        "plain_s": t_plain,
        "kidneyfl_s": fed["wall"],
        "wall_ratio": fed["wall"] / t_plain,
        "plain_per_round_s": per_round_plain,
        "kidneyfl_per_round_s": per_round_fed,
        "steady_round_ratio": per_round_fed / per_round_plain,
        "fixed_cost_per_round_s": per_round_fed - per_round_plain,
        "startup_s": fed["wall"] - per_round_fed * args.rounds,
    }
    print(
        f"plain {t_plain:.1f} s, kidneyfl {fed['wall']:.1f} s: wall ratio "
        f"{row['wall_ratio']:.2f}; per round {per_round_plain:.2f} s vs "
        f"{per_round_fed:.2f} s (steady ratio {row['steady_round_ratio']:.2f}, "
        f"fixed cost {row['fixed_cost_per_round_s']:.2f} s/round); start-up "
        f"{row['startup_s']:.1f} s once per run"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
