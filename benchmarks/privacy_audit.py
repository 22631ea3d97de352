"""Privacy audits, non-DP versus DP at epsilon 1, 3 and 8 (docs/privacy-audit.md).

Two parts:

``white-box``: the DP-SGD mechanism alone, through the site's ``make_private``
(Opacus, Poisson sampling), on a linear model with m Dirac-gradient canaries
(Steinke et al. 2023, one run). Rows: the one-run lower bound next to the
accountant's epsilon, and the same run with the noise removed behind the
accountant's back (the "broken DP" row).

``federation``: real simulated federations (``sim.runner.simulate``) with
black-box canary patients at the first site (what ``kidneyfl simulate
--audit-canaries N`` does), then the membership-inference audit of the final
model at every site (what ``kidneyfl site audit-privacy`` does). Settings:

- ``overfit``: 2 sites x 16 tiny phantom patients (8 train, 8 held out),
  3 rounds x 40 local epochs, batch 4: few patients, many epochs;
- ``demo``: the three example hospitals and the default plan (``make demo``).

Canary inclusion coins come from the OS (never reproducible, by design); model
initialisation and phantom data are seeded (plan ``seed``, phantom seeds).

    .venv/bin/python benchmarks/privacy_audit.py white-box [--repeats 3]
    .venv/bin/python benchmarks/privacy_audit.py federation --setting overfit
    .venv/bin/python benchmarks/privacy_audit.py federation --setting demo

Options: ``--epsilons inf,1,3,8`` (inf = no DP); ``--canaries`` (white-box
1000; federation 0 = no canary audit, e.g. 32); ``--out`` (default
``runs/privacy-audit-bench``; rows are appended to ``rows.jsonl`` there).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import yaml
from harness import ROOT, dp_privacy, float_list, parser, phantom_site, stopwatch

OVERFIT_PLAN = {
    "model": "unet-tiny",
    "spacing-mm": "8,8,10",
    "patch-size": "32,32,16",
    "num-server-rounds": 3,
    "local-epochs": 40,
    "batch-size": 4,
    "learning-rate": 0.01,
    "min-sites": 2,
}
OVERFIT_SITES = (("site-1", "standard-nephro", 1), ("site-2", "thin-slice-cm", 2))


def _eps_label(eps: float) -> str:
    return "no DP" if math.isinf(eps) else f"{eps:g}"


def _save(args: argparse.Namespace, row: dict) -> None:
    with (Path(args.out) / "rows.jsonl").open("a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")


def white_box(args: argparse.Namespace) -> list[dict]:
    """One-run white-box audits of DP-SGD on the linear model."""
    from client.privacy.canaries import calibrated_linear_audit

    rows = []
    for eps in args.epsilons:
        for broken in (False, True) if not math.isinf(eps) else (False,):
            for rep in range(args.repeats):
                with stopwatch() as took, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = calibrated_linear_audit(
                        eps, canaries=args.canaries, break_noise=broken
                    )
                row = {
                    "part": "white-box",
                    "target_epsilon": _eps_label(eps),
                    "noise_removed": broken,
                    "repeat": rep,
                    "seconds": round(took.s, 1),
                    **r.to_dict(),
                }
                rows.append(row)
                _save(args, row)
                print(
                    f"white-box eps={_eps_label(eps):>6} broken={broken!s:5} "
                    f"noise={r.noise_multiplier:.3f} "
                    f"accountant={r.accountant_epsilon:.3f}"
                    f" correct={r.guess.correct}/{r.guess.k_pos + r.guess.k_neg}"
                    f" eps_lb={r.epsilon_lb:.3f}",
                    flush=True,
                )
    return rows


def _site_yamls(setting: str, row_dir: Path, dp: bool) -> list[Path]:
    """Site YAMLs for one row, each with its own state directory (ledger)."""
    if setting == "overfit":
        return [
            phantom_site(
                row_dir,
                name,
                cases=16,
                seed=seed,
                profile=profile,
                scale=5,
                privacy=dp_privacy(dp),
                validation_fraction=0.5,
                generate=False,  # simulate writes the declared phantoms
                data_root=row_dir.parent / "data" / name,
            )
            for name, profile, seed in OVERFIT_SITES
        ]
    return [_demo_site(s, row_dir, dp) for s in ("a", "b", "c")]


def _demo_site(letter: str, row_dir: Path, dp: bool) -> Path:
    """The example hospital's YAML with this row's state and privacy."""
    from common.config import load_site_config

    site = load_site_config(ROOT / "sites" / f"hospital-{letter}.yaml")
    doc = site.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["state_dir"] = str(row_dir / "state" / site.name)
    if not dp:
        doc["privacy"] = {"enabled": False}
    else:
        doc["privacy"]["max_epsilon"] = 100.0
    path = row_dir / f"{site.name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _simulate_row(
    args: argparse.Namespace, eps: float, row_dir: Path, sites: list[Path]
) -> tuple[dict, float]:
    """One simulated run (with canaries when asked); returns the canary audit
    (``{"site": None}`` without one) and the seconds it took."""
    from sim.canary_cases import finish_canary_audit, prepare_canary_sites
    from sim.runner import simulate

    base = row_dir.parent
    overrides = dict(OVERFIT_PLAN) if args.setting == "overfit" else {}
    if not math.isinf(eps):
        overrides["dp-target-epsilon"] = eps
    run_dir = base / "runs" / row_dir.name
    with stopwatch() as took:
        sim_sites = sites
        if args.canaries:
            sim_sites = prepare_canary_sites(sites, args.canaries, run_dir)
        simulate(sim_sites, row_dir.name, base / "runs", overrides, stream=False)
        canary = {"site": None}
        if args.canaries:
            canary = json.loads(finish_canary_audit(run_dir).read_text())
    return canary, took.s


def _audit_row(
    args: argparse.Namespace, eps: float, rep: dict, canary: dict, t_sim: float
) -> dict:
    """The row of one site's membership-inference audit."""
    a, c = rep["attacks"]["loss-threshold"], rep["attacks"]["calibrated"]
    return {
        "part": "federation",
        "setting": args.setting,
        "target_epsilon": _eps_label(eps),
        "site": rep["site"],
        "members": rep["members"],
        "non_members": rep["non_members"],
        "accountant_epsilon": rep["accountant_epsilon"],
        "loss_auc": a["auc"],
        "loss_tpr_1pct": a["operating_points"][0]["tpr"],
        "loss_tpr_01pct": a["operating_points"][1]["tpr"],
        "calibrated_auc": c["auc"],
        "calibrated_tpr_1pct": c["operating_points"][0]["tpr"],
        "mia_epsilon_lb": max(a["epsilon_lb"], c["epsilon_lb"]),
        "mean_loss_members": rep["mean_loss"]["members"],
        "mean_loss_non_members": rep["mean_loss"]["non_members"],
        "canary": canary if rep["site"] == canary["site"] else None,
        "simulate_seconds": round(t_sim, 1),
    }


def _print_audit(row: dict) -> None:
    canary = row["canary"]
    print(
        f"{row['setting']} eps={row['target_epsilon']:>6} {row['site']}: accountant "
        f"{row['accountant_epsilon']} loss AUC {row['loss_auc']:.3f} calibrated AUC "
        f"{row['calibrated_auc']:.3f} MIA eps_lb {row['mia_epsilon_lb']:.3f}"
        + (
            f" | canaries {canary['correct']}/{canary['guesses']} "
            f"eps_lb {canary['epsilon_lb']:.3f}"
            if canary
            else ""
        ),
        flush=True,
    )


def federation(args: argparse.Namespace) -> list[dict]:
    """Simulated runs with canaries, then the site audits, per epsilon."""
    from client.privacy.membership import audit_site

    base = Path(args.out) / args.setting
    rows = []
    for eps in args.epsilons:
        name = f"audit-{args.setting}-{_eps_label(eps).replace(' ', '')}"
        row_dir = base / name
        row_dir.mkdir(parents=True, exist_ok=True)
        sites = _site_yamls(args.setting, row_dir, not math.isinf(eps))
        canary, t_sim = _simulate_row(args, eps, row_dir, sites)
        for site_yaml in sites:
            rep = audit_site(
                site_yaml,
                base / "runs" / name / "final",
                out=row_dir / f"mia-{site_yaml.stem}.json",
            )
            row = _audit_row(args, eps, rep, canary, t_sim)
            rows.append(row)
            _save(args, row)
            _print_audit(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run one part and append its rows to ``--out/rows.jsonl``."""
    p = parser(__doc__, json_out=False)
    p.add_argument("part", choices=("white-box", "federation"))
    p.add_argument("--setting", choices=("overfit", "demo"), default="overfit")
    p.add_argument(
        "--epsilons",
        default="inf,1,3,8",
        type=float_list,
        help="target epsilons; inf = no DP",
    )
    p.add_argument("--canaries", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "runs" / "privacy-audit-bench"))
    args = p.parse_args(argv)
    if args.canaries is None:
        args.canaries = 1000 if args.part == "white-box" else 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.part == "white-box":
        white_box(args)
    else:
        federation(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
