"""Prognosis on the phantom benchmark: each site alone, pooled, FedAvg without
DP and with DP at epsilon 1, 3 and 8, the CNN and the clinical-only model,
with seeds and spread, next to the generator's best achievable C-index.

The three prognosis demo sites (``sites/prognosis/hospital-*.yaml``: 200
phantom patients each, outcomes from ``sim/phantoms/survival.py``'s known
hazard). Every row is a real Flower simulation (``sim.runner.simulate``) of
the plan in ``sites/prognosis/plan.toml``; "site alone" and "pooled" are
``kidneyfl simulate --baselines local,pooled`` of the no-DP run (the same
optimiser steps, without DP). Each final model is evaluated on every site's
validation patients (40 a site); the oracle is Harrell's C of the true linear
predictor on the same patients (``survival-truth.json``).

    .venv/bin/python benchmarks/prognosis.py                # 3 seeds, every row
    .venv/bin/python benchmarks/prognosis.py --seeds 0 --rows "FedAvg, no DP"

Writes ``benchmarks/results/prognosis.json`` after every run and prints the
table (mean and standard deviation over seeds of the patient-weighted mean
over sites).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
import tomllib
from pathlib import Path

import harness
import yaml
from harness import ROOT, int_list, parser, stopwatch

log = logging.getLogger("benchmarks.prognosis")

SITES = ("hospital-a", "hospital-b", "hospital-c")
PLAN = tomllib.loads((ROOT / "sites" / "prognosis" / "plan.toml").read_text())
CNN = {"model": "prognosis-cnn", "learning-rate": 0.003}
CLINICAL = {"prognosis-covariates": "age,sex,size"}
# row -> (epsilon or None for no DP, plan keys over PLAN)
ROWS: dict[str, tuple[float | None, dict]] = {
    "FedAvg, no DP": (None, {}),
    "FedAvg, DP eps 8": (8.0, {}),
    "FedAvg, DP eps 3": (3.0, {}),
    "FedAvg, DP eps 1": (1.0, {}),
    "FedAvg CNN, no DP": (None, CNN),
    "FedAvg CNN, DP eps 8": (8.0, CNN),
    "FedAvg clinical only, DP eps 8": (8.0, CLINICAL),
}
BASELINE_ROW = "FedAvg, no DP"  # its run also trains each site alone and pooled
SCORES = ("c-harrell", "c-uno", "td-auc-1095", "ibs")


def site_yamls(work: Path, run: str, dp: bool) -> list[Path]:
    """The demo sites' YAMLs with this run's own state folder (a fresh ledger)
    and a ceiling no benchmark run reaches."""
    paths = []
    for name in SITES:
        doc = yaml.safe_load(
            (ROOT / "sites" / "prognosis" / f"{name}.yaml").read_text()
        )
        base = ROOT / "sites" / "prognosis"
        doc["data"]["root"] = str((base / doc["data"]["root"]).resolve())
        doc["state_dir"] = str(work / "state" / run / name)
        doc["device"] = "cpu"
        privacy = {"enabled": dp, "min_cases_for_aggregates": 5}
        if dp:
            privacy |= {"max_epsilon": 100.0, "delta": 1e-3}
        doc["privacy"] = privacy
        path = work / "sites" / run / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc))
        paths.append(path)
    return paths


def oracles(sites: list[Path]) -> dict[str, dict[str, float]]:
    """Per site: the oracle C on its validation patients, and how many."""
    from client.tasks.prognosis.data import load_prognosis_data
    from common.config import Plan, load_site_config
    from sim.phantoms.survival import TRUTH_JSON, oracle_c_index

    plan = Plan.model_validate(PLAN)
    out = {}
    for path in sites:
        site = load_site_config(path)
        ids = load_prognosis_data(site, plan).validation.case_ids
        truth = json.loads((site.data.root / TRUTH_JSON).read_text())
        out[site.name] = {"oracle": oracle_c_index(truth, ids), "patients": len(ids)}
    return out


def one_run(work: Path, row: str, seed: int) -> dict:
    """Simulate one row's federation; evaluate its models at every site."""
    from sim.cli import simulate_baselines
    from sim.runner import simulate

    eps, extra = ROWS[row]
    run = f"{row.lower().replace(',', '').replace(' ', '-')}-seed{seed}"
    run += time.strftime("-%H%M%S")
    sites = site_yamls(work, run, eps is not None)
    plan = PLAN | extra | {"seed": seed}
    if eps is not None:
        plan["dp-target-epsilon"] = eps
    with stopwatch() as t_sim:
        run_dir = simulate(
            sites, run_name=run, out_dir=work / "runs", overrides=plan,
            flwr_home=work / "flwr-home", stream=False,
        )  # fmt: skip
    kinds = ["local", "pooled"] if row == BASELINE_ROW else []
    with stopwatch() as t_eval:
        comparison = json.loads(simulate_baselines(sites, run_dir, kinds).read_text())
    models = comparison["values"]
    res = {"run": run, "sim_s": t_sim.s, "eval_s": t_eval.s, "models": {}}
    for name, per_site in models.items():
        if isinstance(per_site, dict) and all(s in per_site for s in SITES):
            res["models"][name] = {
                s: {k: per_site[s].get(k) for k in (*SCORES, "cases-outcome")}
                for s in SITES
            }
    res["oracle"] = oracles(sites)
    return res


def pooled_score(per_site: dict, key: str) -> float | None:
    """Patient-weighted mean of ``key`` over the sites that have it."""
    pairs = [
        (v[key], v.get("cases-outcome") or 0)
        for v in per_site.values()
        if isinstance(v.get(key), int | float)
    ]
    total = sum(w for _, w in pairs)
    return sum(x * w for x, w in pairs) / total if total else None


def summarise(runs: dict[str, dict[str, dict]]) -> list[dict]:
    """Table rows: per seed the patient-weighted mean over sites, then mean,
    SD and count over seeds; "each site alone" is each site's own model on
    its own patients; the oracle beside (the same patients in every run)."""
    table: dict[str, dict[str, list[float]]] = {}

    def add(name: str, per_site: dict) -> None:
        cell = table.setdefault(name, {})
        for key in SCORES:
            v = pooled_score(per_site, key)
            if v is not None:
                cell.setdefault(key, []).append(v)

    oracle: dict[str, float] = {}
    for row, by_seed in runs.items():
        for seed, res in by_seed.items():
            models = res["models"]
            add(row, models["federated"])
            if "pooled" in models:
                add("pooled (no DP)", models["pooled"])
            alone = {
                s: models[f"local-{s}"][s] for s in SITES if f"local-{s}" in models
            }
            if len(alone) == len(SITES):
                add("each site alone (no DP)", alone)
            orc = res["oracle"]
            total = sum(o["patients"] for o in orc.values())
            oracle[seed] = (
                sum(o["oracle"] * o["patients"] for o in orc.values()) / total
            )
    table["oracle (true hazard)"] = {"c-harrell": list(oracle.values())}
    out = []
    for name, cells in table.items():
        row = {"row": name}
        for key in SCORES:
            vs = cells.get(key, [])
            row[key] = (
                (statistics.fmean(vs), statistics.pstdev(vs), len(vs)) if vs else None
            )
        out.append(row)
    return out


def render(rows: list[dict]) -> str:
    head = f"{'':34}" + "".join(f"{k:>18}" for k in SCORES)
    lines = [head]
    for r in rows:
        cells = [
            f"{m:.3f} ± {sd:.3f} ({n})" if v else "-"
            for k in SCORES
            for v in [r[k]]
            for m, sd, n in [v or (0, 0, 0)]
        ]
        lines.append(f"{r['row']:34}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, json_out=False)
    ap.add_argument("--seeds", type=int_list, default=[0, 1, 2])
    ap.add_argument("--rows", default=";".join(ROWS), help="rows, ';'-separated")
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "prognosis-bench"))
    ap.add_argument(
        "--json", default=str(ROOT / "benchmarks" / "results" / "prognosis.json")
    )
    ap.add_argument("--report", action="store_true", help="print the table only")
    ap.add_argument(
        "--resume", action="store_true", help="keep the runs already in --json"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    json_path = Path(args.json)
    if args.report:
        print(render(summarise(json.loads(json_path.read_text())["runs"])))
        return 0
    wanted = [r.strip() for r in args.rows.split(";")]
    rows = [r for r in ROWS if r in wanted] or list(ROWS)
    harness.set_task_identity()
    work = Path(args.work_dir).resolve()
    earlier = json.loads(json_path.read_text()) if args.resume else {}
    out = {
        "config": {
            "plan": PLAN,
            "rows": {r: ROWS[r] for r in rows},
            "seeds": args.seeds,
            "cpus": os.cpu_count(),
            "load_at_start": os.getloadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "runs": {r: dict(earlier.get("runs", {}).get(r, {})) for r in rows},
    }
    started = time.monotonic()
    for seed in args.seeds:
        for row in rows:
            if str(seed) in out["runs"][row]:
                continue  # --resume: measured already
            res = one_run(work, row, seed)
            res["load"] = os.getloadavg()
            out["runs"][row][str(seed)] = res
            out["wall_s"] = time.monotonic() - started
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(out, indent=1))
            log.info(
                "%s seed %d: %.0f s + %.0f s", row, seed, res["sim_s"], res["eval_s"]
            )
    out["config"]["load_at_end"] = os.getloadavg()
    json_path.write_text(json.dumps(out, indent=1))
    print(render(summarise(out["runs"])))
    print(f"\nwall time {out['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
