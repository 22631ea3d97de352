"""Mixed CT + MR federations: one network for both modalities, measured.

Four phantom sites, two CT and two MR (``mr-t2``, see docs/mr.md), each pair
non-IID (another scanner, another case mix; the CT and the MR pair have the
same two case mixes, so modality is what separates them). Per seed, four real
Flower simulations (``sim.runner.simulate``) with the same network
(``unet-tiny-affine``) and the same optimiser steps per site:

- ``CT only``: the two CT sites, ``modality = "CT"``;
- ``MR only``: the two MR sites, ``modality = "MR"``;
- ``mixed FedAvg``: all four, ``modality = "mixed"``, every weight averaged
  (each scan is z-scored within its own body or HU window already);
- ``mixed FedBN``: all four, ``modality = "mixed"`` and ``fedbn = true``
  (each site keeps its InstanceNorm scales and shifts).

Every final model is evaluated on every site's validation split: a FedBN
model at each site with that site's own norm layers, and once more as
exported, with the global norm layers (the row ``mixed FedBN (exported
norm)``); a single-modality model on the other modality's sites too, with
that site's own preprocessing. The table gives kidney and tumour Dice per
modality (mean over the modality's sites per seed, then mean +- sd and
min-max over seeds) and each mixed row's ratio to the single-modality
federation of the same modality.

    .venv/bin/python benchmarks/mixed_modality.py --seeds 0,1,2
    .venv/bin/python benchmarks/mixed_modality.py --quick    # smoke run, ~2 min
    .venv/bin/python benchmarks/mixed_modality.py --seeds 0 --rounds 16 \\
        --rows "CT only,MR only,mixed FedAvg" --json runs/mixed-modality-r16.json
    .venv/bin/python benchmarks/mixed_modality.py \\
        --from-results runs/mixed-modality.json      # only the tables

Torch runs on ``--threads`` threads (default 1) in this process and at every
site, and ``--parallel-sites`` sites train at once (default 1), so that a
shared machine keeps cores free. DP is off (docs/mixed-modality.md says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from harness import ROOT, int_list, parser, stopwatch

log = logging.getLogger("mixed-modality")

# -- sites and federations ---------------------------------------------------------

# tumours the 4 x 4 x 5 mm grid resolves (as the utility benchmark's hospitals)
LARGE_TUMOURS = {"tumour_median_diameter_mm": 55.0, "tumour_min_diameter_mm": 30.0}
MIX_A = {"tumour_prevalence": 0.9, "cyst_prevalence": 0.3}
MIX_B = {"tumour_prevalence": 0.7, "cyst_prevalence": 0.5}


@dataclass(frozen=True)
class SiteSpec:
    """A phantom site: scanner profile, modality, generator seed, overrides."""

    profile: str
    modality: str
    seed: int
    overrides: dict[str, float] = field(default_factory=dict)


SITES: dict[str, SiteSpec] = {
    "ct-a": SiteSpec("standard-nephro", "CT", 11, LARGE_TUMOURS | MIX_A),
    "ct-b": SiteSpec("thick-slice-noisy", "CT", 12, LARGE_TUMOURS | MIX_B),
    "mr-a": SiteSpec("mr-t2", "MR", 21, LARGE_TUMOURS | MIX_A),
    # another MR scanner: thicker slices, coarser in-plane, twice the noise
    "mr-b": SiteSpec(
        "mr-t2",
        "MR",
        22,
        LARGE_TUMOURS
        | MIX_B
        | {"noise_hu": 24.0, "slice_thickness_mm": 5.0, "inplane_spacing_mm": 0.9},
    ),
}
MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class Federation:
    """Which sites train together, with which plan keys."""

    sites: tuple[str, ...]
    plan: dict[str, object]
    reference: dict[str, str] = field(default_factory=dict)  # modality -> row


SINGLE = {"CT": "CT only", "MR": "MR only"}
FEDERATIONS: dict[str, Federation] = {
    "CT only": Federation(("ct-a", "ct-b"), {"modality": "CT"}),
    "MR only": Federation(("mr-a", "mr-b"), {"modality": "MR"}),
    "mixed FedAvg": Federation(tuple(SITES), {"modality": "mixed"}, SINGLE),
    "mixed FedBN": Federation(
        tuple(SITES), {"modality": "mixed", "fedbn": True}, SINGLE
    ),
}

# The demo's grid and patch; every row runs rounds x local epochs x
# ceil(train cases / batch) optimiser steps per site.
PLAN = {
    "model": "unet-tiny-affine",  # affine InstanceNorm: FedBN has layers to keep
    "spacing-mm": "4,4,5",
    "patch-size": "32,32,32",
    "batch-size": 6,
    "learning-rate": 0.01,
    "num-server-rounds": 8,
    "local-epochs": 3,
    "fraction-evaluate": 0.0,  # each final model is evaluated once, afterwards
}
QUICK_PLAN = PLAN | {
    "spacing-mm": "6,6,8",
    "patch-size": "32,32,16",
    "batch-size": 2,
    "num-server-rounds": 1,
    "local-epochs": 1,
}


@dataclass(frozen=True)
class Sizes:
    """Cases per site, their validation share and the phantoms' voxel scale."""

    cases: int = 36
    validation_fraction: float = 0.25
    scale: float = 4.0


FULL = Sizes()
QUICK = Sizes(cases=6, validation_fraction=0.34, scale=5.0)


def site_yaml(
    work: Path, name: str, spec: SiteSpec, sizes: Sizes, threads: int
) -> Path:
    """Write ``work/sites/<name>.yaml`` (a phantom site of ``spec``, DP off,
    ``cpu_threads`` = ``threads``) and return its path. One state folder per
    site for every run: the preprocessing cache is shared, and FedBN's norm
    layers are kept per run id."""
    doc = {
        "name": name,
        "data": {
            "root": str(work / "data" / f"{name}-{sizes.cases}"),
            "validation_fraction": sizes.validation_fraction,
            "modality": spec.modality,
        },
        "device": "cpu",
        "cpu_threads": threads,
        "state_dir": str(work / "state" / name),
        # small synthetic sites release means over their few validation cases
        "privacy": {"enabled": False, "min_cases_for_aggregates": 1},
        "phantom": {
            "profile": spec.profile,
            "cases": sizes.cases,
            "seed": spec.seed,
            "scale": sizes.scale,
            "overrides": dict(spec.overrides),
        },
    }
    path = work / "sites" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def write_sites(work: Path, sizes: Sizes, threads: int) -> dict[str, Path]:
    """Every site's YAML, validated, and its phantom cases (kept if written)."""
    from common.config import load_site_config
    from sim.phantoms.sites import write_site_phantom

    paths = {}
    for name, spec in SITES.items():
        paths[name] = site_yaml(work, name, spec, sizes, threads)
        write_site_phantom(load_site_config(paths[name]))
    return paths


# -- one federation, evaluated everywhere -----------------------------------------


def evaluate_everywhere(
    run_dir: Path, fed: Federation, sites: dict[str, Path], own_norm: bool = True
) -> dict[str, dict[str, float]]:
    """The run's final model at every site's validation split.

    The plan is the run's with ``modality = "mixed"``, so that each site's
    scans get their own modality's preprocessing whatever the run trained on.
    With FedBN and ``own_norm``, a member site evaluates with its own norm
    layers; without ``own_norm``, every site gets the exported model as it is
    (``final/``: the global norm layers, still at their initial values).

    Raises
    ------
    FileNotFoundError
        A FedBN member site without its norm layers for this run.
    """
    from client.local_state import NORM_FILE, overlay_local_norm, personal_dir
    from client.tasks.registry import get_task
    from client.train import select_device
    from common.config import load_site_config, privacy_run_id
    from common.task_models import build_plan_model
    from common.weights import import_state
    from server.checkpoint import load_checkpoint
    from sim.baselines import run_plan

    plan = run_plan(run_dir).model_copy(update={"modality": "mixed"})
    state, _ = load_checkpoint(run_dir / "final")
    task = get_task(plan.task)
    # The sites keep their norm layers under the run id they account under
    # (the run's name and its schedule), not the run folder's name, which
    # sim.baselines uses (it then finds none and keeps the global layers).
    run_id = privacy_run_id(run_dir.name, plan)
    out = {}
    for name, path in sites.items():
        site = load_site_config(path)
        own = state
        if plan.fedbn and own_norm and name in fed.sites:
            if not (personal_dir(site, run_id) / NORM_FILE).exists():
                raise FileNotFoundError(f"{name}: no FedBN norm layers for {run_id}")
            own = overlay_local_norm(state, site, run_id)
        model = build_plan_model(plan)
        import_state(model, own)
        data = task.load_data(site, plan)
        metrics = task.evaluate(model, data, plan, select_device(site.device))
        out[name] = {k: float(v) for k, v in metrics.items() if _number(v)}
    return out


def _number(v: object) -> bool:
    return isinstance(v, int | float) and math.isfinite(float(v))


def run_federation(
    row: str, seed: int, sites: dict[str, Path], args: argparse.Namespace
) -> dict:
    """Simulate one federation and evaluate its final model at every site."""
    from sim.runner import simulate

    fed = FEDERATIONS[row]
    work = Path(args.work_dir).resolve()
    run = f"{row.lower().replace(' ', '-')}-seed{seed}-{time.strftime('%H%M%S')}"
    plan = args.plan | fed.plan | {"seed": seed, "min-sites": len(fed.sites)}
    cores = os.cpu_count() or 1
    with stopwatch() as t_sim:
        run_dir = simulate(
            [sites[s] for s in fed.sites], run_name=run, out_dir=work / "runs",
            overrides=plan, flwr_home=work / "flwr-home",
            cpus_per_site=max(1, cores // args.parallel_sites), stream=False,
        )  # fmt: skip
    with stopwatch() as t_eval:
        values = evaluate_everywhere(run_dir, fed, sites)
    res = {"sites": values, "run": run, "sim_s": t_sim.s, "eval_s": t_eval.s}
    if fed.plan.get("fedbn"):  # what `kidneyfl predict` would load
        res[EXPORTED] = evaluate_everywhere(run_dir, fed, sites, own_norm=False)
    return res


EXPORTED = "exported"  # a FedBN run's result key: the exported model everywhere
EXPORTED_ROW = " (exported norm)"  # its table row: the run's row and this


def rows_of(runs: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """``runs`` with one more row per FedBN row: its exported model's
    results, ``{seed: {"sites": ...}}``."""
    out = dict(runs)
    for row, by_seed in runs.items():
        exported = {
            k: {"sites": r[EXPORTED]} for k, r in by_seed.items() if EXPORTED in r
        }
        if exported:
            out[row + EXPORTED_ROW] = exported
    return out


def federation_of(row: str) -> Federation | None:
    """The federation a table row reports (a FedBN row's exported model too)."""
    return FEDERATIONS.get(row.removesuffix(EXPORTED_ROW))


# -- the table ---------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample sd (0 for one value), min and max of ``values``; NaN for none."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        nan = float("nan")
        return {"mean": nan, "sd": nan, "min": nan, "max": nan, "n": 0}
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {
        "mean": statistics.fmean(vals),
        "sd": sd,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def modality_value(per_site: dict, modality: str, metric: str) -> float:
    """Mean of ``metric`` over the sites of ``modality`` (NaN where none has it:
    a region no validation case contains)."""
    vals = [
        per_site[s][metric]
        for s, spec in SITES.items()
        if spec.modality == modality and metric in per_site.get(s, {})
    ]
    return statistics.fmean(vals) if vals else float("nan")


METRICS = {"kidney": "dice-kidney", "tumour": "dice-tumour"}


def summarise(runs: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """``{row: {"CT kidney": spread, ...}}`` over the seeds of each row, with
    ``ratio`` (mean / the single-modality row's mean) for the mixed rows."""
    out: dict[str, dict[str, dict]] = {}
    for row, by_seed in runs.items():
        out[row] = {}
        for mod in MODALITIES:
            for region, metric in METRICS.items():
                vals = [
                    modality_value(r["sites"], mod, metric) for r in by_seed.values()
                ]
                out[row][f"{mod} {region}"] = spread(vals)
    for row, cells in out.items():
        fed = federation_of(row)
        ref_rows = fed.reference if fed else {}
        for key, cell in cells.items():
            ref = ref_rows.get(key.split()[0])
            base = out.get(ref, {}).get(key, {}).get("mean", float("nan"))
            cell["ratio"] = cell["mean"] / base if ref and base else float("nan")
    return out


def _cell(c: dict, ratio: bool) -> str:
    if not c["n"]:
        return "-"
    text = f"{c['mean']:.3f} ± {c['sd']:.3f} ({c['min']:.2f}-{c['max']:.2f})"
    if ratio and math.isfinite(c.get("ratio", float("nan"))):
        text += f" x{c['ratio']:.2f}"
    return text


def render(summary: dict[str, dict[str, dict]], seeds: int) -> str:
    """A markdown table: one row per federation, Dice per modality and region
    (mean ± sd (min-max) over ``seeds`` seeds, xRATIO to the single-modality
    federation); a single-modality model on the other modality is in brackets."""
    keys = [f"{m} {r}" for m in MODALITIES for r in METRICS]
    lines = [
        "| federation | " + " | ".join(f"{k} Dice" for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for row, cells in summary.items():
        fed = federation_of(row)
        own = set(fed.sites) if fed else set()
        texts = []
        for k in keys:
            mod = k.split()[0]
            trained_on = any(SITES[s].modality == mod for s in own)
            t = _cell(cells[k], ratio=True)
            texts.append(t if trained_on else f"[{t}]")
        lines.append(f"| {row} | " + " | ".join(texts) + " |")
    return (
        "\n".join(lines)
        + f"\n\n{seeds} seed(s); [..]: a model never trained on that modality."
    )


def render_sites(runs: dict[str, dict[str, dict]]) -> str:
    """Kidney / tumour Dice at each site, mean over seeds."""
    names = list(SITES)
    lines = [
        "| federation | " + " | ".join(f"{n} (k / t)" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row, by_seed in runs.items():
        cells = []
        for n in names:
            k, t = (
                spread(
                    [r["sites"].get(n, {}).get(m, math.nan) for r in by_seed.values()]
                )
                for m in METRICS.values()
            )
            cells.append(f"{k['mean']:.2f} / {t['mean']:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the whole benchmark -----------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Every federation of every seed; the JSON is rewritten after each run."""
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if args.quick else FULL
    out: dict = {
        "config": {
            "quick": args.quick,
            "seeds": args.seeds,
            "plan": args.plan,
            "sizes": vars(sizes),
            "sites": {n: vars(s) for n, s in SITES.items()},
            "federations": {n: vars(f) for n, f in FEDERATIONS.items()},
            "threads": args.threads,
            "parallel_sites": args.parallel_sites,
            "dp": False,
            "cpus": os.cpu_count(),
            "load_at_start": os.getloadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "runs": {row: {} for row in args.rows},
    }
    started = time.monotonic()
    with stopwatch() as t:
        sites = write_sites(work, sizes, args.threads)
    out["config"]["phantom_s"] = t.s
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for row in args.rows:
            res = run_federation(row, seed, sites, args)
            res["load"] = os.getloadavg()
            out["runs"][row][str(seed)] = res
            out["wall_s"] = time.monotonic() - started
            json_path.write_text(json.dumps(out, indent=1))
            log.info("%s seed %d: %.0f s + %.0f s evaluation", row, seed,
                     res["sim_s"], res["eval_s"])  # fmt: skip
    out["config"]["load_at_end"] = os.getloadavg()
    json_path.write_text(json.dumps(out, indent=1))
    return out


def report(out: dict) -> str:
    """The tables of a results JSON."""
    seeds = len({seed for by_seed in out["runs"].values() for seed in by_seed})
    runs = rows_of({row: by_seed for row, by_seed in out["runs"].items() if by_seed})
    return (
        render(summarise(runs), seeds)
        + "\n\nPer site (kidney / tumour Dice, mean over seeds):\n\n"
        + render_sites(runs)
        + f"\n\nwall time {out.get('wall_s', 0) / 60:.1f} min"
    )


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, json_out=False)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (__doc__ or "").split("\n", 2)[2]
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="plan seeds")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, ~2 min")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--parallel-sites", type=int, default=1, help="sites training at once"
    )
    p.add_argument(
        "--rows",
        type=lambda t: [r.strip() for r in t.split(",") if r.strip()],
        default=list(FEDERATIONS),
        help=f"federations to run (default all: {','.join(FEDERATIONS)})",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="num-server-rounds (default 8)"
    )
    p.add_argument(
        "--work-dir", default=None, help="default runs/mixed-modality[-quick]"
    )
    p.add_argument(
        "--json", default=None, help="default runs/mixed-modality[-quick].json"
    )
    p.add_argument("--from-results", default=None, help="only render this JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or re-render its JSON) and print the tables."""
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # MONAI's deprecation notes, repeated at every site's evaluation
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    if args.from_results:
        out = json.loads(Path(args.from_results).read_text())
    else:
        tag = "mixed-modality-quick" if args.quick else "mixed-modality"
        args.work_dir = args.work_dir or str(ROOT / "runs" / tag)
        args.json = args.json or str(ROOT / "runs" / f"{tag}.json")
        args.plan = dict(QUICK_PLAN if args.quick else PLAN)
        if args.rounds is not None:
            args.plan["num-server-rounds"] = args.rounds
        if bad := sorted(set(args.rows) - set(FEDERATIONS)):
            ap.error(f"--rows: unknown {bad}; use {','.join(FEDERATIONS)}")
        if args.quick:
            args.seeds = args.seeds[:1]
        # the sites' processes inherit it (Ray workers start with it)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
        out = run(args)
        print(f"\nresults: {args.json}")
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
