"""Commands the consortium (and researchers) run: ``simulate``, ``report``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from server.simulate import PROJECT_DIR

DEFAULT_SITES = ",".join(
    str(PROJECT_DIR / "sites" / f"hospital-{s}.yaml") for s in ("a", "b", "c")
)


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


def _simulate(args: argparse.Namespace) -> int:
    from server.report import read_metrics, summary_table
    from server.simulate import simulate

    kinds = [k for k in (args.baselines or "").split(",") if k]
    if kinds and args.baselines_fn is None:
        raise ValueError("--baselines needs the kidneyfl command (cli.main)")
    unknown = set(kinds) - {"local", "pooled"}
    if unknown:
        raise ValueError(f"--baselines: unknown {sorted(unknown)}; use local,pooled")
    overrides = _parse_set(args.set)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.resume:
        overrides["resume"] = True
    name = args.run_name or time.strftime("sim-%Y%m%d-%H%M%S")
    sim_sites = [Path(p) for p in args.sites.split(",") if p]
    if args.audit_canaries:  # canary patients at the first site (issue 21)
        if args.audit_fns is None:
            raise ValueError("--audit-canaries needs the kidneyfl command (cli.main)")
        prepare, _ = args.audit_fns
        sim_sites = prepare(sim_sites, args.audit_canaries, Path(args.out_dir) / name)
    run_dir = simulate(
        sim_sites,
        run_name=name,
        out_dir=Path(args.out_dir),
        overrides=overrides,
        flwr_home=Path(args.flwr_home) if args.flwr_home else None,
        cpus_per_site=args.cpus_per_site,
        verbose=args.verbose,
    )
    entries = read_metrics(run_dir)
    print()
    print(summary_table(entries))
    print(f"\nreport: {run_dir / 'report.html'}")
    if kinds:
        path = args.baselines_fn(
            [Path(p) for p in args.sites.split(",") if p], run_dir, kinds
        )
        print(f"\nbaselines {','.join(kinds)}: {path}")
    if args.audit_canaries:
        print(f"\n{args.audit_fns[1](run_dir)}")
    print(f"\nrun directory: {run_dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from server.report import read_metrics, round_line, summary_table
    from server.status import progress_text, read_status, status_line

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"{run_dir}: no such run folder; runs are under runs/<run-name>"
        )
    status, entries = read_status(run_dir), read_metrics(run_dir)
    print(f"run {run_dir.name}: {status_line(status)}")
    for e in entries:
        print(round_line(e))
    progress = progress_text(status)
    if progress:
        print(progress)
    if entries and status.get("state") not in ("running", "waiting-for-sites"):
        print()
        print(summary_table(entries))
    if (run_dir / "report.html").is_file():
        print(f"\nreport: {run_dir / 'report.html'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from server.deliver import report
    from server.report import read_metrics, round_line, summary_table

    entries = read_metrics(Path(args.run_dir))
    if not entries:
        raise FileNotFoundError(f"{args.run_dir}: no metrics.jsonl with rounds")
    for e in entries:
        print(round_line(e))
    print()
    print(summary_table(entries))
    print(f"\nreport: {report(Path(args.run_dir), samples=not args.no_samples)}")
    return 0


BaselinesFn = Callable[[list[Path], Path, list[str]], Path]


def register(
    sub: argparse._SubParsersAction,
    baselines: BaselinesFn | None = None,
    audit: tuple[Callable[..., list[Path]], Callable[[Path], str]] | None = None,
) -> None:
    """Add the coordinator's subcommands.

    ``baselines`` trains ``simulate --baselines`` (site-side code, so the
    top-level ``cli`` passes it in: the coordinator never imports ``client``).
    """
    p = sub.add_parser(
        "simulate",
        help="run a local federation of site YAMLs",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  kidneyfl simulate                          # the three example sites\n"
        "  kidneyfl simulate --rounds 2 --set dp-target-epsilon=4\n"
        "  kidneyfl simulate --run-name my-run --resume --rounds 10\n"
        "results and logs: runs/<run>/ (report.html, status.json, logs/)",
    )
    p.add_argument(
        "--sites",
        default=DEFAULT_SITES,
        help="comma-separated site YAMLs (default: the three example sites)",
    )
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--run-name", default=None)
    p.add_argument("--out-dir", default=str(PROJECT_DIR / "runs"))
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
    p.set_defaults(func=_simulate, baselines_fn=baselines, audit_fns=audit)

    r = sub.add_parser(
        "report",
        help="print a run's metrics and write report.html, plots, TensorBoard events",
        allow_abbrev=False,
        epilog="example: kidneyfl report runs/sim-20260101-120000",
    )
    r.add_argument("run_dir")
    r.add_argument(
        "--no-samples",
        action="store_true",
        help="skip the sample slices (phantom sites only) in report.html",
    )
    r.set_defaults(func=_report)

    st = sub.add_parser(
        "status",
        help="where a run is: state, round lines, the running round, the summary",
        allow_abbrev=False,
        epilog="example: kidneyfl status runs/sim-20260101-120000  (while it runs, "
        "or after)",
    )
    st.add_argument("run_dir")
    st.set_defaults(func=_status)
