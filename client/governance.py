"""Hospital governance: which app bundles may run at the site, and the record.

The site YAML lists the SHA-256 of every app bundle (``.fab``, as ``flwr build``
writes it) that the hospital has reviewed. Before anything from a run's bundle
is installed or imported, the site's executor (``client/gate.py``) hashes the
bundle it received and refuses one that is not listed. This module holds the
parts that need no Flower: hashing, the approval list, the decision, and the
numbers the audit log records.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import yaml

from common.config import SHA256_HEX, ConfigError, SiteConfig, load_site_config

log = logging.getLogger(__name__)

SIMULATION_HASH = "unverified (no site gate)"
_LEDGER: tuple = ()  # (PrivacyLedger, LedgerError), imported on first use


class AppRefused(RuntimeError):
    """The run's bundle is not approved at this site; nothing from it runs.

    The message names the hash and the site, never a path: it goes back to the
    coordinator as the error reply's reason.
    """


def bundle_hash(bundle: str | Path) -> str:
    """SHA-256 (hex) of a ``.fab`` file, or a hash given as text, normalised.

    Raises
    ------
    ValueError
        If ``bundle`` is neither an existing file nor a SHA-256 hex digest.
    """
    text = str(bundle).strip()
    path = Path(text).expanduser()
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = text.lower().removeprefix("sha256:")
    if re.fullmatch(SHA256_HEX, digest):
        return digest
    raise ValueError(
        f"{bundle}: neither a bundle file nor a SHA-256 hex digest; pass the .fab "
        "that `flwr build` wrote, or its 64-character hash"
    )


def check_approved(site: SiteConfig, fab_hash: str, content: bytes) -> None:
    """Refuse unless ``content`` hashes to ``fab_hash`` and that hash is approved.

    Raises
    ------
    AppRefused
        Naming the hash: not approved, or the bundle does not match its
        declared hash.
    """
    actual = hashlib.sha256(content).hexdigest()
    if fab_hash != actual:
        raise AppRefused(
            f"site {site.name} refuses app bundle sha256:{actual}: it does not "
            f"match its declared hash {fab_hash}"
        )
    gov = site.governance
    if not gov.require_approval:
        log.warning(
            "site %s: governance.require_approval is false; running unreviewed "
            "bundle sha256:%s",
            site.name,
            actual,
        )
        return
    if actual not in gov.approved_apps:
        raise AppRefused(
            f"site {site.name} refuses app bundle sha256:{actual}: not in the "
            "site's approved apps; the hospital must review it and run "
            "`kidneyfl site approve`"
        )


def approve(site_yaml: str | Path, bundle: str | Path) -> tuple[str, bool]:
    """Add a bundle's hash to the site YAML's ``governance.approved_apps``.

    Returns the hash and whether it was new. The YAML is rewritten without its
    comments; the file is validated again before it is replaced.
    """
    digest = bundle_hash(bundle)
    site = load_site_config(site_yaml)  # a broken YAML is never rewritten
    assert site.source is not None
    doc = yaml.safe_load(site.source.read_text())
    gov = doc.setdefault("governance", {}) or {}
    doc["governance"] = gov
    apps = list(gov.get("approved_apps") or [])
    if digest in [str(a).lower().removeprefix("sha256:") for a in apps]:
        return digest, False
    apps.append(digest)
    gov["approved_apps"] = apps
    tmp = site.source.with_name(f".{site.source.name}.approve")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        load_site_config(tmp)
    except ConfigError:
        tmp.unlink()
        raise
    tmp.replace(site.source)
    return digest, True


def approvals_report(site_yaml: str | Path) -> str:
    """The approval setting and the approved hashes, one per line."""
    site = load_site_config(site_yaml)
    gov = site.governance
    lines = [
        f"site {site.name}: approval "
        + ("required" if gov.require_approval else "OFF (development only)"),
    ]
    lines += [f"  sha256:{h}" for h in gov.approved_apps]
    if not gov.approved_apps:
        lines.append("  (no approved app bundles)")
    return "\n".join(lines)


def spent_epsilon(site: SiteConfig) -> float | None:
    """Epsilon the site's ledger has recorded so far (None without DP or ledger)."""
    global _LEDGER
    if not site.privacy.enabled or site.privacy.delta is None:
        return None
    if not _LEDGER:
        # Imported late (torch, Opacus): the gate must start its task heartbeat
        # within seconds; bound once, so later calls keep the site's own copy.
        from client.privacy import LedgerError, PrivacyLedger

        _LEDGER = (PrivacyLedger, LedgerError)
    ledger_cls, error = _LEDGER
    try:
        return ledger_cls(site.state_dir, site.name).epsilon(site.privacy.delta)
    except error:
        return None
