"""Privacy-utility benchmark: local, pooled and FedAvg models with and without DP.

On the fixed phantom benchmark of ``sim/phantoms/benchmark.py`` (three non-IID
hospitals, 120 training patients each, large tumours; a public set for
pretraining), every row trains with the same optimiser-step budget and is
evaluated on each hospital's validation split (``--split tuning`` evaluates
on the tuning split instead, for choosing recipe settings). Rows, per seed:

- ``local`` / ``local DP``: each site alone (its model on its own cases);
- ``pooled`` / ``pooled DP``: all training data in one place, DP-SGD at the
  reference epsilon (the centralised-DP reference);
- ``fedavg`` and ``fedavg DP eps=E`` for each ``--epsilons`` value;
- one row per ``--recipe NAME:KEY=VALUE[,KEY=VALUE]`` (plan overrides, FedAvg
  with DP at the reference epsilon);
- ``pretrained``: ``kidneyfl pretrain`` on the public set for the budget's
  steps (or ``--pretrain-steps``), evaluated as is; ``pretrained + fedavg DP``:
  a federation started from it (``initial-checkpoint``), with its gain over
  the pretrained model; with ``--pretrained-recipe NAME:KEY=VALUE`` (plan
  overrides on that federation, e.g. a lower learning rate), one row per
  recipe instead.

``--rows`` picks row groups (``reference``: FedAvg, local and pooled without
DP; ``curve``: FedAvg DP at each epsilon, local and pooled DP; ``epsilons``:
FedAvg DP at each epsilon only; ``recipes``; ``pretrained``;
``pretrained-references``: FedAvg, local and pooled without DP from the
pretrained model, with the first pretrained recipe's keys; ``pretrained-curve``:
FedAvg DP at each epsilon, local and pooled DP, from the pretrained model with
the first pretrained recipe's keys); ``--merge FILE``
adds this run's rows to an earlier results JSON instead of starting a new one.

Local and pooled rows are ``sim.baselines`` of the FedAvg runs (no DP, and
DP at the reference epsilon); federated rows are real Flower simulations.
``--quick`` is a smoke run: a few cases per site, 1 round, 1 seed, no
epsilon 1 and 3 rows; its JSON goes under ``runs/utility-quick/``.

    .venv/bin/python benchmarks/utility.py --seeds 0,1,2 \\
        --recipe "label-classes:patch-sampling=label-classes"
    .venv/bin/python benchmarks/utility.py --quick      # smoke run, minutes
    .venv/bin/python benchmarks/utility.py --from-results docs/utility.json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness import ROOT, float_list, int_list, parser, stopwatch
from utility_table import plot, table

from sim.phantoms import benchmark as bench

log = logging.getLogger("utility")

# The benchmark's plan (the rest is [tool.flwr.app.config]); rounds, local
# epochs and batch size fix every row's optimiser steps.
PLAN = {
    "model": "unet-tiny",
    "spacing-mm": "4.0,4.0,5.0",
    "patch-size": "32,32,32",
    "batch-size": 24,
    "learning-rate": 0.01,
    "num-server-rounds": 6,
    "local-epochs": 2,
    "min-sites": 3,
    "fraction-evaluate": 0.0,  # each final model is evaluated once, afterwards
}
# set per row by the benchmark, never by a recipe
FIXED_KEYS = ("seed", "dp-target-epsilon", "initial-checkpoint", "task")
QUICK_PLAN = PLAN | {
    "spacing-mm": "6,6,8",
    "patch-size": "32,32,16",
    "batch-size": 2,
    "num-server-rounds": 1,
    "local-epochs": 1,
}


# -- the plan, its budget and the recipes ----------------------------------------------


def site_steps(plan: dict, n_train: int) -> int:
    """Optimiser steps one site runs in a federation of ``plan``."""
    per_epoch = max(1, math.ceil(n_train / int(plan["batch-size"])))
    return int(plan["num-server-rounds"]) * int(plan["local-epochs"]) * per_epoch


def parse_recipe(text: str, plan: dict, n_train: int) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` -> (name, plan overrides), checked.

    A value may hold commas (``patch-class-ratios=1,1,2,1``): a comma splits
    only before the next ``key=``.

    Raises
    ------
    ValueError
        Malformed text, a key the plan does not know (from ``load_plan``), or a
        recipe that changes the step budget.
    """
    from common.config import load_plan
    from sim.cli import _parse_set
    from sim.runner import default_plan

    name, sep, body = text.partition(":")
    if not (sep and name and body):
        raise ValueError(f"--recipe expects NAME:KEY=VALUE[,KEY=VALUE], got {text!r}")
    overrides = _parse_set(re.split(r",(?=[a-z0-9-]+=)", body))
    if fixed := sorted(set(overrides) & set(FIXED_KEYS)):
        raise ValueError(
            f"--recipe {name} sets {fixed}, which the benchmark sets for each row "
            "(use --seeds, --reference-epsilon); remove them from the recipe"
        )
    load_plan({**default_plan(), **plan, **overrides}, f"--recipe {name}")
    budget = site_steps(plan, n_train)
    if site_steps(plan | overrides, n_train) != budget:
        raise ValueError(
            f"--recipe {name} changes the optimiser steps per site from {budget} "
            f"to {site_steps(plan | overrides, n_train)}; every row has the same "
            "budget: keep num-server-rounds x local-epochs x ceil(training cases / "
            f"batch-size) at {budget}"
        )
    return name, overrides


# -- one benchmark run --------------------------------------------------------------


class Bench:
    """The work folder, data sizes, split and plan that every row shares."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.work = Path(args.work_dir).resolve()
        self.sizes = bench.QUICK if args.quick else bench.FULL
        self.split = args.split
        self.plan = dict(QUICK_PLAN if args.quick else PLAN)
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.budget = site_steps(self.plan, self.sizes.train)
        # pretraining on public data costs no privacy: by default the rows'
        # whole budget (all sites' steps), or --pretrain-steps
        default = self.budget * len(bench.HOSPITALS)
        self.pretrain_steps = args.pretrain_steps or default
        self.pretrained_row = (
            "pretrained"
            if self.pretrain_steps == default
            else f"pretrained ({self.pretrain_steps} steps)"
        )

    def sites(self, run: str, dp: bool) -> list[Path]:
        """Site YAMLs for one run: its own state folders (a fresh privacy
        ledger), sharing each hospital's preprocessing cache."""
        paths = []
        for name in bench.HOSPITALS:
            state = self.work / "state" / run / name
            state.mkdir(parents=True, exist_ok=True)
            cache = self.work / "cache" / name
            cache.mkdir(parents=True, exist_ok=True)
            if not (state / "cache").exists():
                (state / "cache").symlink_to(cache, target_is_directory=True)
            path = self.work / "sites" / run / f"{name}.yaml"
            paths.append(
                bench.site_yaml(
                    path,
                    name,
                    self.work,
                    self.sizes,
                    split=self.split,
                    dp=dp,
                    state_dir=state,
                )
            )
        return paths


def _values(path: Path) -> dict:
    return json.loads(path.read_text())["values"]


def federated(
    b: Bench, row: str, seed: int, dp_eps: float | None, extra: dict
) -> tuple[Path, list[Path], dict]:
    """Simulate one federation and evaluate its final model at every site;
    returns (run folder, sites, row result with ``eval_s``)."""
    from sim.cli import simulate_baselines
    from sim.runner import simulate

    run = f"{re.sub(r'[^a-z0-9.-]+', '-', row.lower())}-seed{seed}-{b.stamp}"
    sites = b.sites(run, dp_eps is not None)
    plan = b.plan | {"seed": seed, **extra}
    if dp_eps is not None:
        plan["dp-target-epsilon"] = dp_eps
    with stopwatch() as t_sim:
        run_dir = simulate(
            sites, run_name=run, out_dir=b.work / "runs", overrides=plan,
            flwr_home=b.work / "flwr-home", stream=True,
        )  # fmt: skip
    with stopwatch() as t_eval:
        values = _values(simulate_baselines(sites, run_dir, []))
    result = {
        "sites": values["federated"],
        "wall_s": t_sim.s + t_eval.s,
        "steps": b.budget * len(sites),
        "eval_s": t_eval.s,
        "run": run,
    }
    return run_dir, sites, result


def baselines(b: Bench, sites: list[Path], run_dir: Path, fed: dict, dp: bool) -> dict:
    """The local and pooled rows of a finished run ``fed`` (training and
    evaluation time each, less the federated model's evaluation they repeat)."""
    from sim.cli import simulate_baselines

    rows = {}
    suffix = " DP" if dp else ""
    for kind in ("local", "pooled"):
        with stopwatch() as t:
            values = _values(simulate_baselines(sites, run_dir, [kind]))
        wall = max(0.0, t.s - fed["eval_s"])
        steps = b.budget * len(sites)
        if kind == "pooled":
            rows["pooled" + suffix] = {"sites": values["pooled"], "wall_s": wall}
        else:
            own = {s: values[f"local-{s}"][s] for s in bench.HOSPITALS}
            matrix = {s: values[f"local-{s}"] for s in bench.HOSPITALS}
            rows["local" + suffix] = {"sites": own, "wall_s": wall, "matrix": matrix}
        rows[kind + suffix]["steps"] = steps
    return rows


def evaluate_checkpoint(ckpt: Path, sites: list[Path], plan: dict) -> dict:
    """A checkpoint's metrics at every site's validation split."""
    from client.tasks.registry import get_task
    from client.train import select_device
    from common.config import load_plan, load_site_config
    from common.task_models import build_plan_model
    from common.weights import import_state
    from server.checkpoint import load_checkpoint
    from sim.runner import default_plan

    state, _ = load_checkpoint(ckpt)
    p = load_plan({**default_plan(), **plan}, "utility plan")
    task = get_task(p.task)
    model = build_plan_model(p)
    import_state(model, state)
    out = {}
    for path in sites:
        site = load_site_config(path)
        data = task.load_data(site, p)
        out[site.name] = task.evaluate(model, data, p, select_device(site.device))
    return out


# recipe keys that change the pretrained model itself (it is pretrained again)
PRETRAIN_KEYS = ("model", "augmentation")


def pretrained(b: Bench, seed: int, extra: dict | None = None) -> tuple[Path, dict]:
    """``kidneyfl pretrain`` on the public set for ``b.pretrain_steps`` steps
    (with the plan keys ``extra``); returns the checkpoint and its row."""
    from cli.pretrain import pretrain

    public = bench.public_yaml(b.work / "sites" / "public.yaml", b.work, b.sizes)
    plan = b.plan | {"seed": seed} | (extra or {})
    steps = b.pretrain_steps
    # one pretrained model per seed, plan and data, reused by later runs
    key = json.dumps([plan, steps, vars(b.sizes)], sort_keys=True).encode()
    out = b.work / "pretrained" / f"seed{seed}-{hashlib.sha256(key).hexdigest()[:12]}"
    with stopwatch() as t:
        if not (out / "latest.json").exists():
            pretrain(
                public, out, dataset=f"kidneyfl phantoms ({bench.PUBLIC[0].name})",
                licence="synthetic, no restrictions", steps=steps, overrides=plan,
            )  # fmt: skip
        sites = b.sites(f"pretrained-eval-{b.stamp}", dp=False)
        values = evaluate_checkpoint(out, sites, plan)
    trained_s = json.loads((out / "latest.json").read_text())
    trained_s = trained_s.get("pretrained", {}).get("seconds")
    return out, {"sites": values, "wall_s": t.s, "steps": steps,
                 "checkpoint": out.name, "train_s": trained_s}  # fmt: skip


ROW_GROUPS = (
    "reference",
    "curve",
    "epsilons",
    "recipes",
    "pretrained",
    "pretrained-references",
    "pretrained-curve",
)
# ``epsilons`` is for adding FedAvg DP rows to an earlier run: in a default
# run it would train the curve's rows again and overwrite them
DEFAULT_ROWS = tuple(g for g in ROW_GROUPS if g != "epsilons")


def run_seed(
    b: Bench, seed: int, args: argparse.Namespace, save: Callable[[str, dict], None]
) -> None:
    """The chosen rows (``args.rows``) of one seed; ``save(row, result)`` after
    each."""
    ref = args.reference_epsilon
    if "reference" in args.rows:
        run_dir, sites, res = federated(b, "fedavg", seed, None, {})
        save("fedavg", res)
        for row, r in baselines(b, sites, run_dir, res, dp=False).items():
            save(row, r)
    if "curve" in args.rows:
        if not args.quick:
            for eps in args.epsilons:
                if eps != ref:
                    res = federated(b, f"dp-eps{eps:g}", seed, eps, {})[2]
                    save(f"fedavg DP eps={eps:g}", res)
        run_dir, sites, res = federated(b, f"dp-eps{ref:g}", seed, ref, {})
        save(f"fedavg DP eps={ref:g}", res)
        for row, r in baselines(b, sites, run_dir, res, dp=True).items():
            save(f"{row} eps={ref:g}", r)
    if "epsilons" in args.rows:  # FedAvg DP at each --epsilons value only
        for eps in args.epsilons:
            res = federated(b, f"dp-eps{eps:g}", seed, eps, {})[2]
            save(f"fedavg DP eps={eps:g}", res)
    if "recipes" in args.rows:
        for name, overrides in args.recipes:
            res = federated(b, f"recipe-{name}", seed, ref, overrides)[2]
            save(f"recipe {name}", res)
    if "pretrained" in args.rows:
        pre = b.pretrained_row
        ckpt, res = pretrained(b, seed)
        save(pre, res)
        extra = {"initial-checkpoint": str(ckpt)}
        if not args.pretrained_recipes:
            res = federated(b, "pretrained-dp", seed, ref, extra)[2]
            save(f"{pre} + fedavg DP eps={ref:g}", res | {"base": pre})
        for name, overrides in args.pretrained_recipes:
            base, start = pre, extra
            if own := {k: v for k, v in overrides.items() if k in PRETRAIN_KEYS}:
                base = f"{pre} [{name}]"
                ckpt_own, res = pretrained(b, seed, own)
                save(base, res)
                start = {"initial-checkpoint": str(ckpt_own)}
            res = federated(b, f"pretrained-{name}", seed, ref, start | overrides)[2]
            save(f"{pre} + {name}", res | {"base": base})
    if "pretrained-references" in args.rows:
        # the federation's references from the same start, with the first
        # pretrained recipe's keys: FedAvg, each site alone and pooled, no DP
        ckpt, _ = pretrained(b, seed)
        keys = dict(args.pretrained_recipes[0][1]) if args.pretrained_recipes else {}
        extra = {"initial-checkpoint": str(ckpt)} | keys
        run_dir, sites, res = federated(b, "pretrained-fedavg", seed, None, extra)
        pre = b.pretrained_row
        save(f"{pre} + fedavg (no DP)", res | {"base": pre})
        for row, r in baselines(b, sites, run_dir, res, dp=False).items():
            save(f"{pre} + {row} (no DP)", r | {"base": pre})
    if "pretrained-curve" in args.rows:
        pretrained_curve(b, seed, args, save)


def pretrained_curve(
    b: Bench, seed: int, args: argparse.Namespace, save: Callable[[str, dict], None]
) -> None:
    """The privacy-utility curve from the public start, with the first
    pretrained recipe's keys: FedAvg with DP at each ``--epsilons`` value, and
    each site alone and pooled with DP at the reference epsilon.

    The reference epsilon's federation is reused when the ``pretrained`` group
    (of this run or of a ``--merge`` run) already saved it for this seed and
    its run folder is still on disk: its row is kept as it was and the
    baselines start from its run; otherwise it is run and saved.
    """
    ref = args.reference_epsilon
    ckpt, _ = pretrained(b, seed)
    name, keys = args.pretrained_recipes[0] if args.pretrained_recipes else ("", {})
    extra = {"initial-checkpoint": str(ckpt)} | dict(keys)
    pre, tail = b.pretrained_row, f" {name}" if name else ""
    for eps in sorted({*args.epsilons, ref}):
        row = f"{pre} + fedavg DP eps={eps:g}{tail}"
        kept = args.saved_rows.get(row, {}).get(str(seed))
        if eps == ref and kept and (b.work / "runs" / kept["run"]).is_dir():
            run_dir, res = b.work / "runs" / kept["run"], kept
            sites = b.sites(kept["run"], dp=True)
        else:
            run_dir, sites, res = federated(
                b, f"pretrained-dp-eps{eps:g}", seed, eps, extra
            )
            save(row, res | {"base": pre})
        if eps == ref:
            for kind, r in baselines(b, sites, run_dir, res, dp=True).items():
                save(f"{pre} + {kind} eps={ref:g}{tail}", r | {"base": pre})


def run(args: argparse.Namespace, b: Bench, out_path: Path) -> dict:
    """All seeds; the JSON is rewritten after every row."""
    import torch

    b.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    earlier = json.loads(Path(args.merge).read_text()) if args.merge else None
    out = {
        "config": {
            "quick": args.quick,
            "split": b.split,
            "seeds": args.seeds,
            "sizes": vars(b.sizes),
            "plan": b.plan,
            "steps_per_site": b.budget,
            "reference_epsilon": args.reference_epsilon,
            "recipes": dict(args.recipes),
            "pretrained_recipes": dict(args.pretrained_recipes),
            "rows": list(args.rows),
            "hospitals": {n: p.model_dump() for n, (p, _) in bench.HOSPITALS.items()},
            "public": bench.PUBLIC[0].model_dump(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "rows": {},
    }
    with stopwatch() as t:
        bench.write_data(b.work, b.sizes)
    out["config"]["phantom_s"] = t.s
    if earlier is not None:
        out = _merged(earlier, out, args.merge)

    base_wall = out.get("wall_s", 0.0)
    args.saved_rows = out["rows"]  # rows this run or a merged one saved

    def save(seed: int, row: str, result: dict) -> None:
        out["rows"].setdefault(row, {})[str(seed)] = result
        out["wall_s"] = base_wall + time.monotonic() - started
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1))
        log.info("%s, seed %d: %.0f s", row, seed, result["wall_s"])

    for seed in args.seeds:
        run_seed(b, seed, args, functools.partial(save, seed))
    return out


def _merged(earlier: dict, new: dict, path: str) -> dict:
    """``earlier`` with ``new``'s settings recorded beside it, for ``--merge``.

    Raises
    ------
    ValueError
        If the two runs differ in data, split, plan or reference epsilon: their
        rows would not be comparable.
    """
    same = ("quick", "split", "sizes", "plan", "steps_per_site", "reference_epsilon")
    old, cur = earlier["config"], new["config"]
    if diff := [k for k in same if old.get(k) != cur.get(k)]:
        raise ValueError(
            f"--merge {path}: that run differs in {', '.join(diff)}; its rows "
            "would not be comparable with this run's: use another --json"
        )
    merged = dict(earlier)
    merged["config"] = dict(old)
    merged["config"]["seeds"] = sorted(set(old["seeds"]) | set(cur["seeds"]))
    for key in ("recipes", "pretrained_recipes"):
        merged["config"][key] = {**old.get(key, {}), **cur[key]}
    merged.setdefault("merged_runs", []).append(
        {k: cur[k] for k in ("seeds", "rows", "started", "device", "phantom_s")}
    )
    merged["rows"] = {row: dict(by_seed) for row, by_seed in earlier["rows"].items()}
    return merged


# -- command line ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, json_out=False)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (__doc__ or "").split("\n", 2)[2]
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="plan seeds")
    p.add_argument(
        "--epsilons",
        type=float_list,
        default=[1.0, 3.0, 8.0],
        help="epsilon of each FedAvg DP row (default 1,3,8)",
    )
    p.add_argument(
        "--reference-epsilon",
        type=float,
        default=8.0,
        help="epsilon of the local and pooled DP rows, recipes and pretrained rows",
    )
    p.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="a recipe row: plan overrides on FedAvg with DP (repeatable)",
    )
    p.add_argument(
        "--pretrained-recipe",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="a row: plan overrides on the federation from the pretrained model",
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="optimiser steps of the pretrained model (default: the rows' budget, "
        "all sites' steps); other values name their rows",
    )
    p.add_argument(
        "--rows",
        type=lambda t: [r for r in t.split(",") if r],
        default=list(DEFAULT_ROWS),
        help=f"row groups to run, of {','.join(ROW_GROUPS)} (default: all but "
        "epsilons, whose rows the curve already makes)",
    )
    p.add_argument(
        "--merge",
        default=None,
        help="add this run's rows to this earlier results JSON (written to --json)",
    )
    p.add_argument(
        "--split",
        choices=bench.SPLITS,
        default="validation",
        help="the cases every row is evaluated on (tuning: for choosing settings)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: minutes")
    p.add_argument("--work-dir", default=None, help="default runs/utility[-quick]")
    p.add_argument("--json", default=None, help="default docs/utility.json")
    p.add_argument("--from-results", default=None, help="only render this JSON")
    return p


def _defaults(args: argparse.Namespace) -> None:
    tag = "utility-quick" if args.quick else "utility"
    args.work_dir = args.work_dir or str(ROOT / "runs" / tag)
    if args.json is None and args.merge:
        args.json = args.merge
    if args.json is None:  # only a full run on the reported split goes into docs/
        full = not args.quick and args.split == "validation"
        args.json = (
            ROOT / "docs" / "utility.json"
            if full
            else Path(args.work_dir) / f"{tag}-{args.split}.json"
        )
    if args.quick:
        args.seeds = args.seeds[:1]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or re-render its JSON) and print the tables."""
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.from_results:
        out = json.loads(Path(args.from_results).read_text())
    else:
        _defaults(args)
        b = Bench(args)
        try:
            args.recipes = [parse_recipe(r, b.plan, b.sizes.train) for r in args.recipe]
        except ValueError as exc:
            ap.error(str(exc))
        try:
            args.pretrained_recipes = [
                parse_recipe(r, b.plan, b.sizes.train) for r in args.pretrained_recipe
            ]
        except ValueError as exc:
            ap.error(str(exc))
        if bad := sorted(set(args.rows) - set(ROW_GROUPS)):
            ap.error(f"--rows: unknown {bad}; use {','.join(ROW_GROUPS)}")
        for flag, recipes in (
            ("--recipe", args.recipes),
            ("--pretrained-recipe", args.pretrained_recipes),
        ):
            names = [name for name, _ in recipes]
            if len(set(names)) != len(names):
                ap.error(f"{flag} names must be unique, got {names}")
        out = run(args, b, Path(args.json))
        print(f"\nresults: {args.json}")
    print(table(out))
    json_path = Path(args.from_results or args.json)
    png = json_path.with_suffix(".png")
    plot(out, png)
    print(f"plot: {png}")
    print(f"\nwall time {out.get('wall_s', 0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
