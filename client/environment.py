"""The readiness check's environment part: device, disk, state directory,
privacy ledger, bundle approval, the federation block and the coordinator's
address and TLS.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any, Protocol

from client.data.case_check import FATAL, WARN, Finding
from common.config import ConfigError, SiteConfig


class SiteCheck(Protocol):
    """What these checks write to: the readiness report
    (:class:`client.readiness.SiteCheck`)."""

    environment: dict[str, Any]
    findings: list[Finding]


MIN_FREE_BYTES = 1 * 2**30


def check_environment(site: SiteConfig, report: SiteCheck) -> None:
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
        from client.privacy.ledger import LedgerError, PrivacyLedger

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


def check_governance(site: SiteConfig, report: SiteCheck) -> None:
    """Whether the site's gate would run any bundle at all.

    Approval is on by default, and with it on and no hash approved the gate
    refuses every bundle the coordinator sends: the site would connect, be
    sampled and answer every round with a refusal. That is an ERROR here, so
    ``site check`` does not say READY for a site that cannot train. Approval
    switched off is allowed (development) but named, since the site then runs
    whatever code the coordinator ships.
    """
    gov = site.governance
    env = report.environment
    env["require_approval"] = gov.require_approval
    env["approved_apps"] = list(gov.approved_apps)
    if not gov.require_approval:
        report.findings.append(
            Finding(
                "approval-off",
                WARN,
                str(site.source),
                "governance.require_approval is false: any app bundle the "
                "coordinator sends will run here, reviewed or not",
                "for a real federation remove `require_approval: false` and "
                "approve the consortium's bundle",
            )
        )
    elif not gov.approved_apps:
        report.findings.append(
            Finding(
                "setup-approval",
                FATAL,
                str(site.source),
                "governance.require_approval is on and governance.approved_apps is "
                "empty: the site's gate will refuse every app bundle, so no round "
                "can train here",
                f"review the consortium's bundle and run `kidneyfl site approve "
                f"{site.source} BUNDLE.fab`, or approve its published hash with "
                f"`kidneyfl site approve {site.source} --sha256 HASH`",
            )
        )


def check_node_command(site: SiteConfig, report: SiteCheck) -> None:
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


def check_superlink(address: str, ca: Path | None, report: SiteCheck) -> None:
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
