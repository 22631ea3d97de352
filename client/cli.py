"""Commands hospital IT runs: ``site check|privacy|keygen|start``."""

from __future__ import annotations

import argparse
import datetime as dt

from client.privacy.ledger import PrivacyLedger
from common.config import load_site_config


def privacy_report(site_yaml: str) -> str:
    """The ledger as a table: spent, delta, ceiling, remaining, and per run."""
    site = load_site_config(site_yaml)
    if not site.privacy.enabled:
        return f"site {site.name}: differential privacy is disabled in {site.source}"
    ledger = PrivacyLedger(site.state_dir, site.name)
    delta, ceiling = site.privacy.delta, site.privacy.max_epsilon
    spent = ledger.epsilon(delta)
    lines = [
        f"site {site.name}  ledger {ledger.path}",
        f"epsilon spent {spent:.4f}  delta {delta:g}  ceiling {ceiling:g}  "
        f"remaining {max(0.0, ceiling - spent):.4f}",
        f"{'run':<28}{'rounds':>7}{'steps':>7}{'noise':>8}{'eps (run alone)':>17}"
        f"{'last round':>22}",
    ]
    for r in ledger.runs_summary(delta):
        when = dt.datetime.fromtimestamp(r["last_time"]).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{r['run_id']:<28}{r['rounds']:>7}{r['steps']:>7}"
            f"{r['noise_multiplier']:>8.3f}{r['epsilon_alone']:>17.4f}{when:>22}"
        )
    if not ledger.entries:
        lines.append("(no rounds recorded yet)")
    name = {"prv": "Opacus PRV accountant, tight", "rdp": "Opacus RDP accountant"}
    lines.append(f"epsilon composes over all runs ({name[ledger.accountant]}).")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from client.readiness import check_site, format_check

    report = check_site(
        args.site_yaml,
        superlink=args.superlink,
        root_certificates=Path(args.root_certificates)
        if args.root_certificates
        else None,
        allow_skips=args.allow_skips,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(format_check(report))
    return 0 if report.ok else 1


def _privacy(args: argparse.Namespace) -> int:
    print(privacy_report(args.site_yaml))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from client.node import make_node_key

    pub = make_node_key(Path(args.key), comment=args.comment)
    print(f"private key {args.key} (keep it here, mode 0600)")
    print(f"public key  {pub} (send this file to the consortium to register)")
    return 0


def _start(args: argparse.Namespace) -> int:
    import shlex

    from client.node import exec_supernode, supernode_command

    site = load_site_config(args.site_yaml)
    if site.governance.require_approval:
        # Approved bundles only: the SuperNode hands ClientApps to the site's
        # gate executor, which checks the bundle's hash before any of it runs.
        from client.executor import (
            executor_command,
            isolated_supernode_command,
            run_governed,
        )

        if args.print:
            print(shlex.join(isolated_supernode_command(site)))
            print(shlex.join(executor_command(site)))
            return 0
        return run_governed(args.site_yaml)
    if args.print:
        print(shlex.join(supernode_command(site)))
        return 0
    exec_supernode(site)  # approval explicitly off in the site YAML
    return 0  # not reached


def register(sub: argparse._SubParsersAction) -> None:
    """Add the site's subcommands under ``kidneyfl site``."""
    site = sub.add_parser(
        "site", help="site commands for hospital IT", allow_abbrev=False
    )
    ssub = site.add_subparsers(dest="site_command", required=True)
    p = ssub.add_parser(
        "privacy", help="print the site's privacy ledger", allow_abbrev=False
    )
    p.add_argument("site_yaml")
    p.set_defaults(func=_privacy)
    c = ssub.add_parser(
        "check",
        help="readiness check of the site's config and data",
        allow_abbrev=False,
    )
    c.add_argument("site_yaml")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument(
        "--allow-skips",
        action="store_true",
        help="cases with errors do not fail the check (training leaves them out)",
    )
    c.add_argument(
        "--superlink",
        default=None,
        metavar="HOST:PORT",
        help="also check that the coordinator answers",
    )
    c.add_argument(
        "--root-certificates",
        default=None,
        metavar="CA.PEM",
        help="with --superlink: verify the coordinator's TLS certificate",
    )
    c.set_defaults(func=_check)
    k = ssub.add_parser(
        "keygen",
        help="make this site's SuperNode key pair (send only the .pub)",
        allow_abbrev=False,
    )
    k.add_argument("key", help="path of the private key; KEY.pub is written too")
    k.add_argument("--comment", default="", help="e.g. the site name")
    k.set_defaults(func=_keygen)
    s = ssub.add_parser(
        "start",
        help="start the site's SuperNode from the federation block of its YAML",
        allow_abbrev=False,
    )
    s.add_argument("site_yaml")
    s.add_argument("--print", action="store_true", help="print the command only")
    s.set_defaults(func=_start)
    register_governance(ssub)
    register_audit_privacy(ssub)


# -- Privacy audit (issue 21): membership inference at the site -----------------
def _audit_privacy(args: argparse.Namespace) -> int:
    import json

    from client.privacy.membership import audit_site, format_audit

    report = audit_site(args.site_yaml, args.checkpoint, out=args.out)
    print(json.dumps(report, indent=2) if args.json else format_audit(report))
    return 0


def register_audit_privacy(ssub: argparse._SubParsersAction) -> None:
    """``kidneyfl site audit-privacy``: attack a checkpoint on the site's data."""
    a = ssub.add_parser(
        "audit-privacy",
        help="membership-inference audit of a model on this site's patients "
        "(local report; nothing is sent)",
        allow_abbrev=False,
    )
    a.add_argument("site_yaml")
    a.add_argument(
        "--checkpoint", required=True, help="checkpoint folder, e.g. runs/<run>/final"
    )
    a.add_argument(
        "--out",
        default=None,
        help="JSON report path (default: <state_dir>/privacy-audit/<run>-<time>.json)",
    )
    a.add_argument("--json", action="store_true", help="print the JSON report")
    a.set_defaults(func=_audit_privacy)


# -- Governance (issue 10): approve | approvals | audit | executor -------------
def _approve(args: argparse.Namespace) -> int:
    from client.governance import approve

    digest, new = approve(args.site_yaml, args.bundle, sha256=args.sha256)
    state = "approved" if new else "already approved"
    print(f"sha256:{digest} {state} in {args.site_yaml}")
    return 0


def _approvals(args: argparse.Namespace) -> int:
    from client.governance import approvals_report

    print(approvals_report(args.site_yaml))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from client.audit_log import AuditLog, format_table

    site = load_site_config(args.site_yaml)
    audit = AuditLog(site.state_dir)
    if args.verify:
        check = audit.verify()
        if check.ok:
            print(f"audit log {audit.path}: {check.entries} entries, chain intact")
            print(f"head sha256:{check.head} (keep a copy off-site)")
            return 0
        print(
            f"audit log {audit.path}: entry {check.first_bad} is bad: "
            f"{check.problem} ({check.entries} entries before it verified)"
        )
        return 1
    print(format_table(audit.entries()))
    return 0


def _executor(args: argparse.Namespace) -> int:
    from client.executor import run_executor

    run_executor(args.site_yaml)
    return 0  # not reached


def register_governance(ssub: argparse._SubParsersAction) -> None:
    """``kidneyfl site approve|approvals|audit|executor``."""
    a = ssub.add_parser(
        "approve",
        help="add a reviewed app bundle (.fab or its SHA-256) to the site YAML",
        allow_abbrev=False,
    )
    a.add_argument("site_yaml")
    a.add_argument(
        "bundle",
        nargs="?",
        default=None,
        help="the .fab file `flwr build` wrote, or its hash",
    )
    a.add_argument(
        "--sha256",
        default=None,
        metavar="HEX",
        help="the hash the consortium published; with a bundle too, the bundle "
        "must have this hash or nothing is approved",
    )
    a.set_defaults(func=_approve)
    p = ssub.add_parser(
        "approvals", help="list the site's approved app bundles", allow_abbrev=False
    )
    p.add_argument("site_yaml")
    p.set_defaults(func=_approvals)
    u = ssub.add_parser(
        "audit", help="print or verify the site's audit log", allow_abbrev=False
    )
    u.add_argument("site_yaml")
    u.add_argument(
        "--verify",
        action="store_true",
        help="check the hash chain; exit 1 naming the first bad entry",
    )
    u.set_defaults(func=_audit)
    e = ssub.add_parser(
        "executor",
        help="run ClientApps for the site's SuperNode (--isolation process), "
        "approved bundles only",
        allow_abbrev=False,
    )
    e.add_argument("site_yaml")
    e.set_defaults(func=_executor)
