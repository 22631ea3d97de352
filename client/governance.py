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

from common.atomic import atomic_write_text
from common.config import SiteConfig, load_site_config
from common.site_config import SHA256_HEX

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

    Returns the hash and whether it was new. The hash is written into the
    file's own text, so the operator's comments and layout stay; only if the
    YAML is laid out in a way that edit cannot follow (e.g. an inline list of
    hashes) is it rewritten without comments, with a warning. Either way the
    result must parse to the old settings plus the hash and pass validation
    before it replaces the file.
    """
    digest = bundle_hash(bundle)
    site = load_site_config(site_yaml)  # a broken YAML is never rewritten
    assert site.source is not None
    text = site.source.read_text()
    doc = yaml.safe_load(text)
    gov = doc.setdefault("governance", {}) or {}
    doc["governance"] = gov
    apps = list(gov.get("approved_apps") or [])
    if digest in [str(a).lower().removeprefix("sha256:") for a in apps]:
        return digest, False
    apps.append(digest)
    gov["approved_apps"] = apps
    edited = _text_with_approval(text, digest)
    if edited is None or _safe_load(edited) != doc:
        log.warning(
            "%s: could not add the hash in place; rewriting the YAML without its "
            "comments",
            site.source,
        )
        edited = yaml.safe_dump(doc, sort_keys=False)
    check = site.source.with_name(f".{site.source.name}.approve")
    check.write_text(edited)  # validated as a file, then written atomically
    try:
        load_site_config(check)
    finally:
        check.unlink(missing_ok=True)
    atomic_write_text(site.source, edited)
    return digest, True


def _safe_load(text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


_TOP_GOV = re.compile(r"^governance:[ \t]*(#.*)?$")
_APPS = re.compile(
    r"^(?P<ind>[ \t]+)approved_apps:[ \t]*(?P<val>[^#]*?)[ \t]*(?P<com>#.*)?$"
)


def _text_with_approval(text: str, digest: str) -> str | None:
    """``text`` with ``digest`` appended to ``governance.approved_apps``, as a
    line edit that keeps every comment; None where the layout is not the
    block style this handles (the caller then verifies or falls back)."""
    lines = text.splitlines()
    item = f'"{digest}"'
    gov = next((i for i, ln in enumerate(lines) if _TOP_GOV.match(ln)), None)
    if gov is None:
        if any(ln.startswith("governance:") for ln in lines):
            return None  # an inline mapping
        body = [*lines, "governance:", "  approved_apps:", f"    - {item}"]
        return "\n".join(body) + "\n"
    end = gov + 1  # the governance block: indented, blank or comment lines
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        end += 1
    key = next((i for i in range(gov + 1, end) if _APPS.match(lines[i])), None)
    if key is None:
        child = next(
            (ln for ln in lines[gov + 1 : end] if ln.strip() and ln[0] in " \t"),
            "  x",
        )
        ind = child[: len(child) - len(child.lstrip())]
        new = [f"{ind}approved_apps:", f"{ind}  - {item}"]
        return "\n".join([*lines[: gov + 1], *new, *lines[gov + 1 :]]) + "\n"
    m = _APPS.match(lines[key])
    assert m is not None
    ind, val = m.group("ind"), m.group("val")
    if val == "[]":
        com = f" {m.group('com')}" if m.group("com") else ""
        lines[key] = f"{ind}approved_apps:{com}"
        val = ""
    if val:
        return None  # an inline list, a scalar, an anchor...
    last, item_ind = key, f"{ind}  "
    for i in range(key + 1, end):
        stripped = lines[i].lstrip()
        if stripped.startswith("- "):
            last, item_ind = i, lines[i][: len(lines[i]) - len(stripped)]
        elif stripped and not stripped.startswith("#"):
            break
    lines.insert(last + 1, f"{item_ind}- {item}")
    return "\n".join(lines) + "\n"


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
        from client.privacy.ledger import LedgerError, PrivacyLedger

        _LEDGER = (PrivacyLedger, LedgerError)
    ledger_cls, error = _LEDGER
    try:
        return ledger_cls(site.state_dir, site.name).epsilon(site.privacy.delta)
    except error:
        return None
