"""Commands hospital IT runs: ``site check|privacy|keygen|start|service``,
``site import-dicom`` and the governance and audit commands."""

from __future__ import annotations

import argparse
import datetime as dt

from common.config import load_site_config


def privacy_report(site_yaml: str) -> str:
    """The ledger as a table: spent, delta, ceiling, remaining, and per run."""
    # Imported here: it brings torch, which `site start` (running for months
    # beside the SuperNode) has no use for.
    from client.privacy.ledger import PrivacyLedger

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
        if r["unused_rounds"]:
            lines.append(
                f"  spent, not used: round(s) {_ranges(r['unused_rounds'])} "
                "(the coordinator did not use this site's update)"
            )
    if not ledger.entries:
        lines.append("(no rounds recorded yet)")
    name = {"prv": "Opacus PRV accountant, tight", "rdp": "Opacus RDP accountant"}
    lines.append(f"epsilon composes over all runs ({name[ledger.accountant]}).")
    return "\n".join(lines)


def _ranges(rounds: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1-3, 7``."""
    out: list[str] = []
    for r in sorted(rounds):
        if out and out[-1].split("-")[-1] == str(r - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out)


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

    from client.node import supernode_command
    from client.supervise import Backoff, exec_supernode

    site = load_site_config(args.site_yaml)
    restart = None
    if args.restart == "on-failure":
        restart = Backoff(first=args.restart_delay, most=args.restart_max_delay)
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
        return run_governed(args.site_yaml, restart, args.stop_timeout)
    if args.print:
        print(shlex.join(supernode_command(site)))
        return 0
    # Approval explicitly off in the site YAML.
    return exec_supernode(site, restart, args.stop_timeout)


def _service(args: argparse.Namespace) -> int:
    import getpass
    import os
    import sys
    from pathlib import Path

    from client.supervise import SYSTEMD_BACKOFF, systemd_unit, systemd_version

    site = load_site_config(args.site_yaml)
    if site.federation is None:  # the same refusal as `site start`
        from client.node import supernode_command

        supernode_command(site)
    backoff = args.backoff
    if backoff is None:
        version = systemd_version()
        backoff = "systemd" if (version or 0) >= SYSTEMD_BACKOFF else "kidneyfl"
    user = args.user or getpass.getuser()
    text = systemd_unit(site, user, backoff, args.stop_timeout)
    if args.write is None:
        print(text, end="")
        return 0
    path = Path(args.write)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(
        f"wrote {path} ({backoff} restarts with backoff); then: systemctl "
        f"daemon-reload && systemctl enable --now {path.stem}",
        file=sys.stderr,
    )
    return 0


def _add_start(ssub: argparse._SubParsersAction) -> None:
    s = ssub.add_parser(
        "start",
        help="start the site's SuperNode from the federation block of its YAML "
        "and keep it supervised",
        allow_abbrev=False,
    )
    s.add_argument("site_yaml")
    s.add_argument("--print", action="store_true", help="print the command only")
    s.add_argument(
        "--restart",
        choices=("no", "on-failure"),
        default="no",
        help="on-failure: start the site again when its SuperNode or executor "
        "ends (exit 3 otherwise); for use without systemd or Docker restarts",
    )
    s.add_argument(
        "--restart-delay",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="first delay before a restart; doubles each time (default 5)",
    )
    s.add_argument(
        "--restart-max-delay",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="longest delay between restarts (default 300); it starts over "
        "after an hour without failure",
    )
    s.add_argument(
        "--stop-timeout",
        type=_seconds,
        default=20.0,
        metavar="SECONDS",
        help="how long processes get to stop after SIGTERM before SIGKILL (default 20)",
    )
    s.set_defaults(func=_start)
    v = ssub.add_parser(
        "service",
        help="print (or --write) a systemd unit that runs `site start` and "
        "restarts it with backoff",
        epilog="example: kidneyfl site service sites/hospital-a.yaml --user kidneyfl "
        "--write /etc/systemd/system/kidneyfl-site-hospital-a.service",
        allow_abbrev=False,
    )
    v.add_argument("site_yaml")
    v.add_argument("--write", default=None, metavar="PATH", help="write it here")
    v.add_argument(
        "--user", default=None, help="account to run as (default: the current one)"
    )
    v.add_argument(
        "--backoff",
        choices=("systemd", "kidneyfl"),
        default=None,
        help="who delays restarts: systemd (needs systemd >= 254) or kidneyfl "
        "(`site start --restart on-failure`); default: systemd where this "
        "host's systemd is 254 or later",
    )
    v.add_argument(
        "--stop-timeout",
        type=_seconds,
        default=20.0,
        metavar="SECONDS",
        help="passed to `site start` (default 20)",
    )
    v.set_defaults(func=_service)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text}: give a number of seconds > 0")
    return value


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
    _add_start(ssub)
    register_import_dicom(ssub)
    register_governance(ssub)
    register_audit_privacy(ssub)


# -- DICOM in (issue 29): PACS series -> a KiTS-style site ----------------------
def _import_dicom(args: argparse.Namespace) -> int:
    from pathlib import Path

    from client.data.dicom_import import format_summary, import_dicom

    summary = import_dicom(
        Path(args.src),
        Path(args.out),
        args.pseudonym_prefix,
        modality=args.modality,
        min_slices=args.min_slices,
        segment_map=Path(args.segment_map) if args.segment_map else None,
        pseudonym_map=Path(args.pseudonym_map) if args.pseudonym_map else None,
    )
    print("\n".join(format_summary(summary)))
    return 1 if summary.problems else 0


def register_import_dicom(ssub: argparse._SubParsersAction) -> None:
    """``kidneyfl site import-dicom SRC OUT --pseudonym-prefix P``."""
    d = ssub.add_parser(
        "import-dicom",
        help="turn a folder of DICOM series (a PACS export) into a pseudonymised "
        "KiTS-style dataset that `site check` reads (docs/dicom.md)",
        epilog="example: kidneyfl site import-dicom /exports/pacs /data/kits "
        "--pseudonym-prefix HA  (exit 1 when a series or SEG was refused)",
        allow_abbrev=False,
    )
    d.add_argument("src", help="folder of DICOM files, any depth")
    d.add_argument("out", help="dataset folder to write (the site YAML's data.root)")
    d.add_argument(
        "--pseudonym-prefix",
        required=True,
        metavar="P",
        help="case folders are case_<P><nnnnn>: up to 16 letters, digits or '-'",
    )
    d.add_argument(
        "--modality",
        choices=("CT", "MR"),
        default="CT",
        help="series to import (default CT; MR only where the site declared MR)",
    )
    d.add_argument(
        "--min-slices",
        type=int,
        default=20,
        metavar="N",
        help="fewest slices a series may have (default 20)",
    )
    d.add_argument(
        "--segment-map",
        default=None,
        metavar="CSV",
        help="CSV 'segment,label' mapping DICOM SEG segments (label or SCT:code) "
        "to background, kidney, tumour or cyst",
    )
    d.add_argument(
        "--pseudonym-map",
        default=None,
        metavar="CSV",
        help="where the case-to-patient map is kept (default OUT/../"
        "pseudonym-map.csv; never inside OUT); it must stay at the site",
    )
    d.set_defaults(func=_import_dicom)


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
