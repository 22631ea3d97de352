"""The readiness check hospital IT runs before joining a federation.

``kidneyfl site check sites/<site>.yaml [--json]`` validates the YAML, inspects
every case (via :mod:`client.casecheck`), reports duplicates, unlabelled cases
and class counts, and checks the environment: device, free disk and write access
for the state directory, the privacy ledger, and optionally that the
coordinator's address answers and its TLS certificate verifies. Its output is
for the site's own terminal and never leaves the site.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.casecheck import FATAL, WARN, Finding
from client.data import SiteDataError, inspect
from common.config import ConfigError, SiteConfig, load_site_config
from common.metrics import LABELS

MIN_CASES = 2
MIN_FREE_BYTES = 1 * 2**30


@dataclass
class SiteCheck:
    """Everything the check found. ``ok`` is False when training would fail."""

    site: str
    config: str
    layout: str = ""
    notes: list[str] = field(default_factory=list)
    cases_found: int = 0
    cases_usable: int = 0
    cases_unlabelled: list[str] = field(default_factory=list)
    class_cases: dict[str, int] = field(default_factory=dict)
    class_voxels: dict[str, int] = field(default_factory=dict)
    duplicates: list[list[str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Training can start: enough usable cases and no fatal setup problem."""
        setup_errors = [
            f
            for f in self.findings
            if f.kind.startswith("setup-") and f.severity == FATAL
        ]
        return self.cases_usable >= MIN_CASES and not setup_errors

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json``)."""
        out = asdict(self)
        out["ok"] = self.ok
        return out


def check_site(
    yaml_path: str | Path,
    superlink: str | None = None,
    root_certificates: Path | None = None,
) -> SiteCheck:
    """Run every check; never raises for bad data or config (it reports them)."""
    report = SiteCheck(site="?", config=str(yaml_path))
    try:
        site = load_site_config(yaml_path)
    except ConfigError as exc:
        report.findings.append(
            Finding(
                "setup-config",
                FATAL,
                str(yaml_path),
                str(exc),
                "fix the YAML as the message says",
            )
        )
        return report
    report.site = site.name
    _check_environment(site, report)
    fed = site.federation
    if superlink is None and fed is not None:
        # The YAML's federation block: what `kidneyfl site start` will dial.
        superlink = fed.superlink
        root_certificates = None if fed.insecure else fed.root_certificates
        _check_node_command(site, report)
    if superlink:
        _check_superlink(superlink, root_certificates, report)
    from client.layouts import discover

    d = site.data
    try:
        found = discover(d.root, d.layout, d.label_names, d.manifest)
    except SiteDataError as exc:
        report.findings.append(
            Finding(
                "setup-data-root",
                FATAL,
                str(site.data.root),
                str(exc),
                "set data.root in the site YAML",
            )
        )
        return report
    cases = found.cases
    report.layout = found.layout
    report.notes = list(found.notes)
    report.cases_found = len(cases)
    digests: dict[str, list[str]] = {}
    for case in cases:
        if case.label is None:
            report.cases_unlabelled.append(case.case_id)
        result = inspect(case, frozenset(found.label_map))
        report.findings.extend(result.findings)
        if result.usable and case.label is not None:
            report.cases_usable += 1
            for value, n in result.label_voxels.items():
                name = LABELS.get(found.label_map.get(value, -1), str(value))
                report.class_cases[name] = report.class_cases.get(name, 0) + 1
                report.class_voxels[name] = report.class_voxels.get(name, 0) + n
        if case.image.exists():
            digests.setdefault(_digest(case.image), []).append(case.case_id)
    report.duplicates = [ids for ids in digests.values() if len(ids) > 1]
    for ids in report.duplicates:
        report.findings.append(
            Finding(
                "duplicate",
                WARN,
                ", ".join(ids),
                "these cases have identical images",
                "remove duplicates: one patient must be one case for DP to hold",
            )
        )
    if report.cases_usable < MIN_CASES:
        report.findings.append(
            Finding(
                "setup-too-few-cases",
                FATAL,
                str(site.data.root),
                f"{report.cases_usable} usable labelled case(s); at least {MIN_CASES} "
                "are needed",
                "fix the cases listed above or add data",
            )
        )
    return report


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_environment(site: SiteConfig, report: SiteCheck) -> None:
    import torch

    env = report.environment
    env["cuda_available"] = bool(torch.cuda.is_available())
    env["device"] = site.device
    if site.device == "cuda" and not env["cuda_available"]:
        report.findings.append(
            Finding(
                "setup-device",
                FATAL,
                str(site.source),
                "device: cuda but no CUDA GPU is visible",
                "set device: auto or cpu, or fix the GPU driver",
            )
        )
    state = site.state_dir
    probe_dir = next((p for p in (state, *state.parents) if p.exists()), Path("/"))
    env["state_dir"] = str(state)
    env["free_disk_gb"] = round(shutil.disk_usage(probe_dir).free / 2**30, 2)
    if shutil.disk_usage(probe_dir).free < MIN_FREE_BYTES:
        report.findings.append(
            Finding(
                "setup-disk",
                WARN,
                str(probe_dir),
                f"only {env['free_disk_gb']} GB free "
                "for the state directory (ledger, preprocessing cache)",
                "free space or move state_dir",
            )
        )
    try:
        state.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state):
            pass
        env["state_dir_writable"] = True
    except OSError as exc:
        env["state_dir_writable"] = False
        report.findings.append(
            Finding(
                "setup-state-dir",
                FATAL,
                str(state),
                f"cannot write ({exc.strerror})",
                "give the service user write access or change state_dir",
            )
        )
    if site.privacy.enabled:
        from client.privacy import LedgerError, PrivacyLedger

        try:
            ledger = PrivacyLedger(state, site.name)
            env["epsilon_spent"] = round(ledger.epsilon(site.privacy.delta), 4)
            env["epsilon_ceiling"] = site.privacy.max_epsilon
        except LedgerError as exc:
            report.findings.append(
                Finding(
                    "setup-ledger", FATAL, str(state), str(exc), "restore the ledger"
                )
            )


def _check_node_command(site: SiteConfig, report: SiteCheck) -> None:
    from client.node import supernode_command

    try:
        supernode_command(site)
        report.environment["supernode_command"] = "ok"
    except ConfigError as exc:
        report.findings.append(
            Finding(
                "setup-federation",
                FATAL,
                str(site.source),
                str(exc),
                "fix the federation block as the message says",
            )
        )


def _check_superlink(address: str, ca: Path | None, report: SiteCheck) -> None:
    host, _, port = address.rpartition(":")
    env = report.environment
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            env["superlink_reachable"] = True
            if ca is None:
                return
            ctx = ssl.create_default_context(cafile=str(ca))
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                env["tls_verified"] = True
                env["tls_peer"] = dict(x[0] for x in tls.getpeercert()["subject"])
    except ssl.SSLError as exc:
        env["tls_verified"] = False
        report.findings.append(
            Finding(
                "setup-tls",
                FATAL,
                address,
                f"TLS certificate does not verify ({exc})",
                "use the consortium's CA file, and check the server certificate names "
                "this address",
            )
        )
    except (OSError, ValueError) as exc:
        env["superlink_reachable"] = False
        report.findings.append(
            Finding(
                "setup-superlink",
                FATAL,
                address,
                f"coordinator does not answer ({exc})",
                "check the address, the firewall and that the SuperLink runs",
            )
        )


def format_check(report: SiteCheck) -> str:
    """Text for the site's terminal: summary table, then problems by kind."""
    lines = [
        f"kidneyfl readiness check: site {report.site} ({report.config})",
        f"  layout {report.layout or '?'}",
        *(f"  note: {n}" for n in report.notes),
        f"  cases found {report.cases_found}, usable {report.cases_usable}, "
        f"unlabelled {len(report.cases_unlabelled)}, duplicates "
        f"{sum(len(d) for d in report.duplicates)}",
    ]
    if report.class_cases:
        lines.append(
            "  cases per class: "
            + ", ".join(f"{k} {v}" for k, v in sorted(report.class_cases.items()))
        )
    for k, v in sorted(report.environment.items()):
        lines.append(f"  {k}: {v}")
    by_kind: dict[str, list[Finding]] = {}
    for f in report.findings:
        by_kind.setdefault(f.kind, []).append(f)
    for kind, items in sorted(by_kind.items()):
        lines.append(
            f"{items[0].severity.upper()} {kind} ({len(items)}): {items[0].fix}"
        )
        for f in items:
            lines.append(f"    {f.file}: {f.message}")
    lines.append(
        "READY: training can start"
        if report.ok
        else "NOT READY: training would fail; fix the errors above"
    )
    return "\n".join(lines)
