"""Local, pooled, FedAvg, FedProx and FedBN on hospitals with different scanners.

Three phantom hospitals, one per scanner profile of ``sim/phantoms/ct.py``
(thin-slice corticomedullary, standard nephrographic +20 HU, thick-slice noisy
-25 HU with another case mix), each trained and validated on its own cases.
For every seed it runs three real Flower simulations (``kidneyfl simulate``),
FedAvg with ``--baselines local,pooled``, FedProx and FedBN, all with the same
network (``unet-tiny-affine``, so FedBN has norm layers to keep) and the same
optimiser steps, and writes a table of Dice per KiTS region and method (mean
over sites and seeds) to ``docs/noniid-comparison.md``, in the spirit of
FLamby's Fed-KiTS19 table.

The default is sized for a 2-core CPU (a few minutes per simulation):

    PYTHONPATH=$PWD .venv/bin/python benchmarks/noniid_comparison.py

DP is off by default (``--dp`` turns it on at the plan's epsilon): with about
seven training patients per site, DP noise at epsilon 8 hides the differences
between methods that this table is meant to show.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from harness import ROOT, dp_privacy, int_list, parser, phantom_site

from common.metrics import KITS_REGIONS
from sim.cli import simulate_baselines
from sim.runner import simulate

log = logging.getLogger("noniid")

SITES = {
    "hospital-thin": "thin-slice-cm",
    "hospital-standard": "standard-nephro",
    "hospital-thick": "thick-slice-noisy",
}
METHODS = {
    "FedAvg": {"strategy": "fedavg"},
    "FedProx": {"strategy": "fedprox", "proximal-mu": 0.01},
    "FedBN": {"strategy": "fedavg", "fedbn": True},
}


def write_sites(work: Path, cases: int, scale: float, dp: bool) -> list[Path]:
    """One phantom hospital per scanner profile; returns the site YAMLs.

    The cases are written now (complete cases of an earlier call are kept,
    missing ones written); the YAMLs do not declare them as phantoms.
    """
    return [
        phantom_site(
            work,
            name,
            cases=cases,
            seed=10 + i,
            profile=profile,
            scale=scale,
            # synthetic sites with a handful of validation patients release
            # their means anyway (a site's choice, docs/privacy.md)
            privacy=dp_privacy(dp, max_epsilon=1000.0),
            validation_fraction=0.3,
            device="auto",
            declared=False,
        )
        for i, (name, profile) in enumerate(SITES.items())
    ]


def _plan(args: argparse.Namespace) -> dict:
    """The plan keys every method shares."""
    return {
        "model": "unet-tiny-affine",
        "spacing-mm": args.spacing,
        "patch-size": args.patch,
        "batch-size": args.batch_size,
        "local-epochs": args.local_epochs,
        "learning-rate": args.learning_rate,
        "min-sites": 3,
    }


def run_method(
    method: str, seed: int, sites: list[Path], args: argparse.Namespace
) -> tuple[str, dict]:
    """One simulation of ``method``; returns its name and ``comparison.json``
    (with the local and pooled baselines for FedAvg)."""
    work = Path(args.work_dir).resolve()
    name = f"{method.lower()}-seed{seed}-{int(time.time())}"
    run_dir = simulate(
        sites,
        run_name=name,
        out_dir=work / "runs",
        overrides={
            **_plan(args),
            **METHODS[method],
            "seed": seed,
            "num-server-rounds": args.rounds,
        },
        flwr_home=work / "flwr-home",
        cpus_per_site=1,
        stream=True,
    )
    # FedAvg brings the baselines; the others evaluate the federated model at
    # every site the same way
    simulate_baselines(
        sites, run_dir, ["local", "pooled"] if method == "FedAvg" else []
    )
    return name, json.loads((run_dir / "comparison.json").read_text())


def run(args: argparse.Namespace) -> dict:
    """All simulations; returns {method: {seed: comparison values}}."""
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sites = write_sites(work, args.cases, args.scale, args.dp)
    results: dict[str, dict[int, dict]] = {}
    timings: dict[str, float] = {}
    for seed in args.seeds:
        for method in METHODS:
            t0 = time.monotonic()
            name, comp = run_method(method, seed, sites, args)
            for model, per_site in comp["values"].items():
                if method == "FedAvg" and model != "federated":
                    results.setdefault(model, {})[seed] = per_site
            results.setdefault(method, {})[seed] = comp["values"]["federated"]
            timings[name] = time.monotonic() - t0
            log.info("%s done in %.0f s", name, timings[name])
    return {"results": results, "timings": timings, "sites": list(SITES)}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def table(out: dict) -> str:
    """Markdown: Dice per region (mean over sites, then seeds), per method."""
    res, sites = out["results"], out["sites"]
    regions = [f"dice-{r}" for r in KITS_REGIONS]
    rows: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    # Local (own site): each site's local model on its own validation split
    rows["Local (own site)"] = {
        seed: {s: res[f"local-{s}"][seed][s] for s in sites}
        for seed in res[f"local-{sites[0]}"]
    }
    for s in sites:
        rows[f"Local {s} (all sites)"] = res[f"local-{s}"]
    for name in ("pooled", "FedAvg", "FedProx", "FedBN"):
        rows["Pooled" if name == "pooled" else name] = res[name]
    head = (
        "| method | "
        + " | ".join(regions)
        + " | "
        + " | ".join(f"kidney @ {s}" for s in sites)
    )
    lines = [head + " |", "|" + "---|" * (1 + len(regions) + len(sites))]
    for label, by_seed in rows.items():
        cells = []
        for r in regions:
            cells.append(
                _mean([_mean([m[s][r] for s in sites]) for m in by_seed.values()])
            )
        for s in sites:
            cells.append(_mean([m[s]["dice-kidney"] for m in by_seed.values()]))
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, json_out=False)
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "noniid"))
    p.add_argument("--seeds", type=int_list, default=[0, 1])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--scale", type=float, default=5.0)
    p.add_argument("--spacing", default="6,6,8")
    p.add_argument("--patch", default="32,32,16")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--dp", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "noniid-comparison.md"))
    p.add_argument(
        "--results", default=None, help="raw JSON (default: <work-dir>/results.json)"
    )
    p.add_argument("--from-results", default=None, help="only render this JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write the markdown table."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.from_results:  # re-render a finished run's table
        out = json.loads(Path(args.from_results).read_text())
    else:
        t0 = time.monotonic()
        out = run(args)
        out["args"] = dict(vars(args))
        out["wall_s"] = time.monotonic() - t0
        results = Path(args.results or Path(args.work_dir) / "results.json")
        results.write_text(json.dumps(out, indent=1))
    md = table(out)
    print(md)
    print(f"\nwall time {out['wall_s'] / 60:.1f} min")
    Path(args.out).write_text(document(out, md, argv))
    return 0


def document(out: dict, md: str, argv: list[str] | None) -> str:
    """The generated part of docs/noniid-comparison.md."""
    a = out["args"]
    cmd = "PYTHONPATH=$PWD .venv/bin/python benchmarks/noniid_comparison.py"
    if argv:
        cmd += " " + " ".join(argv)
    return (
        "# Non-IID comparison: local, pooled, FedAvg, FedProx, FedBN\n\n"
        "Generated by `benchmarks/noniid_comparison.py` (see its docstring and "
        "docs/strategies.md).\n\n"
        f"```bash\n{cmd}\n```\n\n"
        f"Setup: {len(out['sites'])} phantom hospitals "
        f"({', '.join(f'{s} = {p}' for s, p in SITES.items())}), {a['cases']} cases "
        f"each at scale {a['scale']} (70/30 train/validation split), spacing "
        f"{a['spacing']} mm, patches {a['patch']}, model unet-tiny-affine, Adam at "
        f"{a['learning_rate']}, batch {a['batch_size']}, {a['rounds']} rounds x "
        f"{a['local_epochs']} local epochs, seeds {a['seeds']}, DP "
        f"{'on' if a['dp'] else 'off'}. Local and pooled baselines ran the same "
        "optimiser steps as the federation (each site its own; pooled the sum). "
        "Dice on each site's validation cases, mean over sites, then over seeds; "
        "the last columns are kidney Dice per site.\n\n"
        f"{md}\n\n"
        f"Wall time: {out['wall_s'] / 60:.1f} min on this machine.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
