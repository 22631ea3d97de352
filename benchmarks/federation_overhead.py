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

import json
import sys
import tempfile
from pathlib import Path

from harness import TINY_PLAN, parser, phantom_site, stopwatch, write_json

PLAN = {
    **TINY_PLAN,
    "batch-size": 8,
    "learning-rate": 0.01,
    "min-sites": 1,
    "fraction-evaluate": 0.0,
}


def plain(site_yaml: Path, rounds: int, epochs: int) -> float:
    """Seconds for rounds x epochs of local training in one process."""
    import torch

    from client.tasks.registry import get_task
    from client.train import local_train
    from common.config import load_plan, load_site_config
    from common.task_models import build_plan_model
    from sim.runner import default_plan

    plan = load_plan({**default_plan(), **PLAN, "local-epochs": epochs})
    site = load_site_config(site_yaml)
    task = get_task(plan.task)
    data = task.load_data(site, plan)  # warm the site cache first, as sims do
    model = build_plan_model(plan)
    with stopwatch() as t:
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
    return t.s


def federated(site_yaml: Path, rounds: int, epochs: int, tmp: Path) -> dict:
    """Wall time of the simulation and the time between round checkpoints."""
    from sim.runner import simulate

    with stopwatch() as wall:
        run = simulate(
            [site_yaml],
            "bench",
            out_dir=tmp / "runs",
            overrides={**PLAN, "num-server-rounds": rounds, "local-epochs": epochs},
            flwr_home=tmp / "flwr-home",
            stream=False,
        )
    times = [
        json.loads(line)["time"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"wall": wall.s, "round_gaps": gaps}


def summary(t_plain: float, fed: dict, rounds: int) -> dict:
    """The ratios and per-round costs of one plain and one federated run."""
    per_round_plain = t_plain / rounds
    gaps = fed["round_gaps"]
    per_round_fed = sum(gaps) / len(gaps) if gaps else float("nan")
    return {
        "plain_s": t_plain,
        "kidneyfl_s": fed["wall"],
        "wall_ratio": fed["wall"] / t_plain,
        "plain_per_round_s": per_round_plain,
        "kidneyfl_per_round_s": per_round_fed,
        "steady_round_ratio": per_round_fed / per_round_plain,
        "fixed_cost_per_round_s": per_round_fed - per_round_plain,
        "startup_s": fed["wall"] - per_round_fed * rounds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cases", type=int, default=40)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        site = phantom_site(
            tmp, "bench-site", cases=args.cases, seed=3, privacy={"enabled": False}
        )
        t_plain = plain(site, args.rounds, args.epochs)
        fed = federated(site, args.rounds, args.epochs, tmp)
    row = {"rounds": args.rounds, "epochs": args.epochs, "cases": args.cases}
    row |= summary(t_plain, fed, args.rounds)
    print(
        f"plain {t_plain:.1f} s, kidneyfl {fed['wall']:.1f} s: wall ratio "
        f"{row['wall_ratio']:.2f}; per round {row['plain_per_round_s']:.2f} s vs "
        f"{row['kidneyfl_per_round_s']:.2f} s (steady ratio "
        f"{row['steady_round_ratio']:.2f}, fixed cost "
        f"{row['fixed_cost_per_round_s']:.2f} s/round); start-up "
        f"{row['startup_s']:.1f} s once per run"
    )
    write_json(args.json, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
