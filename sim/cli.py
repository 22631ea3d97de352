"""Commands for simulation and research: ``simulate`` and ``phantom``.

A local federation of site YAMLs on one machine (``sim.runner``), its
baselines (each site alone, all data pooled) and canary audit, and synthetic
phantom data. None of this travels in the app bundle a hospital approves.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from sim.runner import PROJECT_DIR

log = logging.getLogger("kidneyfl")

DEFAULT_SITES = ",".join(
    str(PROJECT_DIR / "sites" / f"hospital-{s}.yaml") for s in ("a", "b", "c")
)
DEFAULT_PROFILE = "standard-nephro"


def _parse_set(items: list[str]) -> dict[str, object]:
    import tomllib

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value  # bare strings need no quotes
    return out


def _read_plan(path: str) -> dict[str, object]:
    """A plan TOML's keys (``sites/*/plan.toml``), for ``--plan``.

    Raises
    ------
    ValueError
        An unreadable file or invalid TOML, naming the file.
    """
    import tomllib

    try:
        with open(path, "rb") as fh:
            return dict(tomllib.load(fh))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--plan {path}: {exc}") from None


def simulate_baselines(site_paths: list[Path], run_dir: Path, kinds: list[str]) -> Path:
    """Train ``kinds`` baselines for ``run_dir`` and write its comparison.json.

    Raises
    ------
    FileNotFoundError
        If the run has no final model.
    """
    # imported here: torch and Opacus are not needed for `kidneyfl --help`
    from server.checkpoint import CheckpointError, load_checkpoint
    from sim.baselines import run_baselines

    try:
        final_state, _ = load_checkpoint(run_dir / "final")
    except CheckpointError as exc:
        raise FileNotFoundError(f"{run_dir}: no usable final model ({exc})") from None
    return run_baselines(site_paths, run_dir, final_state, kinds)


def audit_prepare(site_paths: list[Path], n: int, run_dir: Path) -> list[Path]:
    """Write N canary patients for the first site; the site YAMLs to simulate."""
    # imported here: torch and MONAI are not needed for `kidneyfl --help`
    from sim.canary_cases import prepare_canary_sites

    return prepare_canary_sites(site_paths, n, run_dir)


def audit_finish(run_dir: Path) -> str:
    """Score the canaries, write ``privacy-audit.json`` and redraw the report
    (which shows the audit); the line to print."""
    from server.deliver import report
    from server.reporting.live_report import draw_bounded
    from sim.canary_cases import finish_canary_audit, format_canary_audit
    from sim.samples import sample_slices

    path = finish_canary_audit(run_dir)
    result = json.loads(path.read_text())
    # the run's record holds it too: one line after the rounds, with no "round"
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"privacy_audit": result}, default=str) + "\n")
    # the audit is written: a report that fails or takes too long is noted
    # (status.json, the log) with how to redraw it, and the command goes on
    draw_bounded(run_dir, lambda: report(run_dir, samples=sample_slices))
    return f"{format_canary_audit(result)}\n({path})"


def _simulate(args: argparse.Namespace) -> int:
    from common.config import run_folder
    from server.reporting.clinical import clinical_lines
    from server.reporting.metrics_log import read_metrics, read_start, summary_table
    from server.reporting.survival import survival_lines
    from sim.runner import simulate

    kinds = [k for k in (args.baselines or "").split(",") if k]
    unknown = set(kinds) - {"local", "pooled"}
    if unknown:
        raise ValueError(f"--baselines: unknown {sorted(unknown)}; use local,pooled")
    overrides = _read_plan(args.plan) if args.plan else {}
    overrides.update(_parse_set(args.set))
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.resume:
        overrides["resume"] = True
    name = args.run_name or time.strftime("sim-%Y%m%d-%H%M%S")
    # before anything is written: a name that is a path never becomes a folder
    # (the operator's own --out-dir may climb with '..': it is resolved first)
    out_dir = Path(args.out_dir).expanduser().resolve()
    run_folder(out_dir, name, source="", keys=("--out-dir", "--run-name"))
    sim_sites = [Path(p) for p in args.sites.split(",") if p]
    if args.audit_canaries:  # canary patients at the first site (issue 21)
        sim_sites = audit_prepare(sim_sites, args.audit_canaries, out_dir / name)
    run_dir = simulate(
        sim_sites,
        run_name=name,
        out_dir=out_dir,
        overrides=overrides,
        flwr_home=Path(args.flwr_home) if args.flwr_home else None,
        cpus_per_site=args.cpus_per_site,
        verbose=args.verbose,
    )
    entries = read_metrics(run_dir)
    print()
    print(summary_table(entries, read_start(run_dir)))
    for line in clinical_lines(run_dir, entries):  # lesions, post-processing, OOD
        print(line)
    for line in survival_lines(run_dir, entries):  # prognosis: scores, KM by risk
        print(line)
    print(f"\nreport: {run_dir / 'report.html'}")
    if kinds:
        path = simulate_baselines(
            [Path(p) for p in args.sites.split(",") if p], run_dir, kinds
        )
        print(f"\nbaselines {','.join(kinds)}: {path}")
    if args.audit_canaries:
        print(f"\n{audit_finish(run_dir)}")
    print(f"\nrun directory: {run_dir}")
    return 0


def _phantom(args: argparse.Namespace) -> int:
    from sim.phantoms.kits_writer import write_site
    from sim.phantoms.profiles import DEFAULT_SCALE, load_profile

    profile = load_profile(args.site_profile)
    if args.task == "classification":
        return _phantom_classification(args, profile)
    dirs = write_site(
        Path(args.out),
        profile,
        args.cases,
        seed=args.seed,
        scale=args.scale or DEFAULT_SCALE,
        overwrite=args.overwrite,
    )
    print(f"{len(dirs)} cases of profile {profile.name} in {args.out} (KiTS layout)")
    if args.task == "prognosis":
        from sim.phantoms.survival import write_outcomes
        from sim.subgroups import plant_subgroups

        plant_subgroups(Path(args.out), profile.name, args.seed)
        kits = write_outcomes(Path(args.out), args.seed)
        print(f"outcomes from a known hazard: {kits} (answer key beside it)")
    return 0


def _parse_mix(text: str | None) -> dict[str, float] | None:
    """``stone=4,normal=1`` -> {"stone": 4.0, "normal": 1.0}."""
    if not text:
        return None
    mix = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        if not sep:
            raise ValueError(f"--class-mix expects class=weight pairs, got {part!r}")
        mix[name.strip()] = float(weight)
    return mix


def _phantom_classification(args: argparse.Namespace, profile) -> int:
    from sim.phantoms.slices import DEFAULT_CLS_SCALE, class_counts, write_cls_site

    mix = _parse_mix(args.class_mix)
    manifest = write_cls_site(
        Path(args.out),
        profile,
        args.cases,
        class_mix=mix,
        seed=args.seed,
        scale=args.scale or DEFAULT_CLS_SCALE,
        overwrite=args.overwrite,
    )
    counts = ", ".join(f"{c} {k}" for c, k in class_counts(args.cases, mix).items())
    print(f"{args.cases} slices of profile {profile.name} ({counts}); {manifest}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate`` and ``phantom``."""
    p = sub.add_parser(
        "simulate",
        help="run a local federation of site YAMLs",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  kidneyfl simulate                          # the three example sites\n"
        "  kidneyfl simulate --rounds 2 --set dp-target-epsilon=4\n"
        "  kidneyfl simulate --sites sites/prognosis/hospital-a.yaml,... "
        "--plan sites/prognosis/plan.toml\n"
        "  kidneyfl simulate --run-name my-run --resume --rounds 10\n"
        "results and logs: runs/<run>/ (report.html, status.json, logs/)",
    )
    p.add_argument(
        "--sites",
        default=DEFAULT_SITES,
        help="comma-separated site YAMLs (default: the three example sites)",
    )
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument(
        "--run-name",
        default=None,
        help="the run's folder under --out-dir: letters, digits, '_', '.', '-' "
        "(default: sim-<date>-<time>)",
    )
    p.add_argument("--out-dir", default=str(PROJECT_DIR / "runs"))
    p.add_argument(
        "--plan",
        default=None,
        metavar="PLAN.toml",
        help="plan keys from a TOML file, e.g. sites/prognosis/plan.toml "
        "(--set overrides them)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a plan key of [tool.flwr.app.config]",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue --run-name from its last checkpoint",
    )
    p.add_argument("--flwr-home", default=None)
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show Flower's and Ray's own logs (always in runs/<run>/logs/)",
    )
    p.add_argument(
        "--cpus-per-site",
        type=int,
        default=None,
        help="cores per virtual site (default: the machine's cores shared among "
        "the sites, at least 1 each)",
    )
    p.add_argument(
        "--baselines",
        default="",
        metavar="local,pooled",
        help="also train each site alone and/or all data pooled, with the same "
        "optimiser steps, and write comparison.json (docs/strategies.md)",
    )
    p.add_argument(
        "--audit-canaries",
        type=int,
        default=0,
        metavar="N",
        help="audit the run's DP in one run: N canary patients at the first site, "
        "each trained on with probability 1/2; writes privacy-audit.json "
        "(docs/privacy-audit.md)",
    )
    p.set_defaults(func=_simulate)

    p = sub.add_parser(
        "phantom",
        help="write synthetic kidney CT cases (KiTS layout, or slices for "
        "--task classification)",
        allow_abbrev=False,
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--site-profile",
        default=DEFAULT_PROFILE,
        help="built-in profile name (thin-slice-cm, standard-nephro, "
        f"thick-slice-noisy) or a YAML file of scanner settings (default: "
        f"{DEFAULT_PROFILE})",
    )
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="voxel size multiplier (1.0 = native scanner spacing)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--task",
        choices=("segmentation", "classification", "prognosis"),
        default="segmentation",
        help="segmentation: KiTS volumes; classification: labelled slices + "
        "manifest.csv (normal, cyst, tumour, stone); prognosis: KiTS volumes "
        "with subgroups.csv and outcomes in kits.json (docs/prognosis.md)",
    )
    p.add_argument(
        "--class-mix",
        default=None,
        metavar="CLASS=WEIGHT,...",
        help="classification: relative class frequencies, e.g. stone=4,normal=1 "
        "(default: equal)",
    )
    p.set_defaults(func=_phantom)
