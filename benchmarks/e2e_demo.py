"""End to end: the README's main job (``make demo``) and where its time goes.

Runs what ``kidneyfl simulate`` runs for the demo (the three example hospitals
of ``sites/``, the plan in pyproject.toml: 5 rounds of DP FedAvg on unet-tiny)
on copies of the site YAMLs whose data and state live in a temporary folder,
so nothing of a real ``make demo`` is touched. Phases:

- ``phantoms``: writing the synthetic cases (timed on its own, first);
- ``data loading``, ``training``, ``evaluation``: from the sites' own
  ``timings.jsonl`` (client/timings.py; one line per message, with its end
  time, loading and work seconds). The first load at a site builds its
  preprocessing cache; later ones read it. Sites run side by side (the
  default shares the cores out: one per site on 2 cores), so the wall time
  during which at least one site was loading or working is split between the
  three phases in proportion to their summed site-seconds (also printed);
- ``coordinator and Flower``: the rest of the run's wall time: SuperLink and
  Ray start-up, ClientApp imports, messaging, aggregation, checkpoints, the
  final export and the report.

    .venv/bin/python benchmarks/e2e_demo.py [--cases 200] [--rounds 5]
        [--cpus-per-site N] [--json out]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml
from harness import ROOT, parser, stopwatch, write_json

DEMO_SITES = ("hospital-a", "hospital-b", "hospital-c")


def _copy_sites(tmp: Path, cases: int | None) -> list[Path]:
    out = []
    for name in DEMO_SITES:
        doc = yaml.safe_load((ROOT / "sites" / f"{name}.yaml").read_text())
        doc["data"]["root"] = str(tmp / "phantoms" / name)
        doc["state_dir"] = str(tmp / "state" / name)
        if cases:
            doc["phantom"]["cases"] = cases
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        out.append(path)
    return out


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def measure(
    cases: int | None, rounds: int | None, cpus_per_site: int | None = None
) -> dict:
    """Seconds per phase of one demo run."""
    from client.timings import read_timings
    from common.config import load_site_config
    from sim.runner import prepare_phantoms, simulate

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = _copy_sites(tmp, cases)
        sites = [load_site_config(p) for p in paths]
        with stopwatch() as phantoms:
            prepare_phantoms(sites)
        t_phantoms = phantoms.s
        overrides = {"num-server-rounds": rounds} if rounds else {}
        with stopwatch() as sim:
            run = simulate(
                paths,
                "demo",
                out_dir=tmp / "runs",
                overrides=overrides,
                flwr_home=tmp / "flwr-home",
                cpus_per_site=cpus_per_site,
                stream=False,
            )
        t_run = sim.s
        lines = [
            json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
        ]
        timings = [t for s in sites for t in read_timings(s.state_dir)]
    row = {
        "cases_per_site": sites[0].phantom.cases if sites[0].phantom else None,
        "rounds": len(lines),
        "total_s": t_phantoms + t_run,
        "phantoms_s": t_phantoms,
    }
    row |= phases(timings, t_run)
    last = lines[-1]
    row["cpus_per_site"] = cpus_per_site
    row["final_kidney_dice"] = last.get("weighted", {}).get("dice-kidney")
    row["max_epsilon"] = max(last.get("epsilon", {0: 0}).values())
    return row


def phases(timings: list[dict], t_run: float) -> dict:
    """The run's wall time split into loading, training, evaluation (the wall
    time any site was busy, shared in proportion to site-seconds) and the rest."""
    load = sum(t["load_s"] for t in timings)
    train = sum(t["work_s"] for t in timings if t["kind"] == "train")
    evaluate = sum(t["work_s"] for t in timings if t["kind"] == "evaluate")
    site_seconds = load + train + evaluate
    busy = busy_seconds(
        [(t["time"] - t["load_s"] - t["work_s"], t["time"]) for t in timings]
    )
    share = busy / site_seconds if site_seconds else 0.0
    return {
        "data_loading_s": load * share,
        "training_s": train * share,
        "evaluation_s": evaluate * share,
        "coordinator_and_flower_s": t_run - busy,
        "site_seconds": {"loading": load, "training": train, "evaluation": evaluate},
        "sites_in_parallel": site_seconds / busy if busy else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--cases", type=int, default=None, help="phantoms per site")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--cpus-per-site", type=int, default=None, help="default: as make demo"
    )
    args = ap.parse_args(argv)
    row = measure(args.cases, args.rounds, args.cpus_per_site)
    total = row["total_s"]
    print(
        f"demo: {total / 60:.1f} min for {row['rounds']} rounds, "
        f"{row['cases_per_site']} cases per site (target 10 min)"
    )
    for key in (
        "phantoms_s",
        "data_loading_s",
        "training_s",
        "evaluation_s",
        "coordinator_and_flower_s",
    ):
        name = key[:-2].replace("_", " ")
        print(f"  {name:<24}{row[key]:>8.1f} s {100 * row[key] / total:>5.1f} %")
    secs = ", ".join(f"{k} {v:.0f}" for k, v in row["site_seconds"].items())
    print(
        f"  site-seconds: {secs}; {row['sites_in_parallel']:.2f} sites busy "
        "on average while any was"
    )
    print(
        f"  final kidney Dice {row['final_kidney_dice']}, "
        f"max epsilon {row['max_epsilon']:.2f}"
    )
    write_json(args.json, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
