"""Hospital governance: which app bundles may run at the site, and the record.

The site YAML lists the SHA-256 of every app bundle (``.fab``, as ``flwr build``
writes it) that the hospital has reviewed. Before anything from a run's bundle
is installed or imported, the site's executor (``client/gate.py``) hashes the
bundle it received and refuses one that is not listed. This module holds the
parts that need no Flower: hashing, the approval list, the decision, and the
numbers the audit log records.

The code that runs is the code approved: Flower 1.42 installs a bundle into
``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash8>`` and, when that folder
already exists, reuses it without looking at its content. So a folder edited
after approval, or one placed in advance under a name whose 8-digit short hash
is an approved bundle's, would run code nobody reviewed. Before every run the
gate therefore compares the folder Flower is about to load with the approved
bytes (:func:`check_installed`): every file of the bundle present with the same
SHA-256, and nothing else in the folder but Python's bytecode caches, which the
gate never reads (it imports the bundle's modules from their verified sources,
``client.gate``). A folder that differs is refused like an unapproved bundle,
and left as it is for the hospital to inspect; it is not repaired, since a
silent reinstall would hide the tampering and race a concurrent task that is
reading the same folder.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import zipfile
from pathlib import Path, PurePosixPath

import yaml

from common.atomic import atomic_write_text
from common.config import SiteConfig, load_site_config
from common.site_config import SHA256_HEX

log = logging.getLogger(__name__)

SIMULATION_HASH = "unverified (no site gate)"
_LEDGER: tuple = ()  # (PrivacyLedger,), imported on first use
# What Flower's install leaves out of the folder: the bundle's manifest, which
# it checks and deletes before it copies the rest.
FLOWER_MANIFEST_DIR = ".info"


class AppRefused(RuntimeError):
    """The run's bundle is not approved at this site; nothing from it runs.

    The message names the hash and the site, never a path: it goes back to the
    coordinator as the error reply's reason.
    """


class LedgerUnreadable(RuntimeError):
    """The site's privacy ledger cannot be read: the site answers nothing.

    The message names the site only; the cause (which may name the ledger's
    path) is chained as ``__cause__`` for the site's own log. The site's edge
    (``client.gate``) answers it with the fixed ``ledger-damaged`` refusal.
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


def approved_digest(bundle: str | Path | None, sha256: str | None) -> str:
    """The hash to approve: a bundle's, the consortium's published one, or both
    when they agree.

    Giving both is how a site checks that the ``.fab`` it reviewed is the one
    the consortium published, so a mismatch approves neither.

    Raises
    ------
    ValueError
        Neither given, ``sha256`` not a SHA-256 hex digest, or the bundle's hash
        differs from ``sha256`` (naming both).
    """
    if bundle is None and sha256 is None:
        raise ValueError("give the bundle (.fab) to approve, its --sha256, or both")
    published = None
    if sha256 is not None:
        published = str(sha256).strip().lower().removeprefix("sha256:")
        if not re.fullmatch(SHA256_HEX, published):
            raise ValueError(
                f"--sha256 {sha256}: not a SHA-256 hex digest (64 hex characters)"
            )
    digest = published if bundle is None else bundle_hash(bundle)
    if published is not None and digest != published:
        raise ValueError(
            f"{bundle} has sha256:{digest}, not the published sha256:{published}; "
            "nothing approved: this is not the bundle the consortium published"
        )
    return digest


def approve(
    site_yaml: str | Path, bundle: str | Path | None = None, sha256: str | None = None
) -> tuple[str, bool]:
    """Add a bundle's hash to the site YAML's ``governance.approved_apps``.

    ``bundle`` is the ``.fab`` file (or its hash as text) and ``sha256`` the
    hash the consortium published; either, or both when they must agree
    (:func:`approved_digest`). Returns the hash and whether it was new. The
    hash is written into the file's own text, so the operator's comments and
    layout stay; only if the YAML is laid out in a way that edit cannot follow
    (e.g. an inline list of hashes) is it rewritten without comments, with a
    warning. Either way the result must parse to the old settings plus the hash
    and pass validation before it replaces the file.
    """
    digest = approved_digest(bundle, sha256)
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
    """Epsilon the site's ledger has recorded so far (None without DP).

    Every request's audit entry carries this number before and after, so a
    site whose ledger cannot be read cannot account for what it answers and
    answers nothing: any failure to read the ledger (unreadable file, damaged
    or foreign content, a ledger that is not a JSON object) raises
    :class:`LedgerUnreadable`, whose text names no path.

    Raises
    ------
    LedgerUnreadable
        With the original exception as its cause, for the site's log.
    """
    global _LEDGER
    if not site.privacy.enabled or site.privacy.delta is None:
        return None
    try:
        if not _LEDGER:
            # Imported late (torch, Opacus): the gate must start its task
            # heartbeat within seconds; bound once, so later calls keep the
            # site's own copy even after the bundle's copy is imported.
            from client.privacy.ledger import PrivacyLedger

            _LEDGER = (PrivacyLedger,)
        return float(_LEDGER[0](site.state_dir, site.name).epsilon(site.privacy.delta))
    except Exception as exc:  # noqa: BLE001 - whatever it is, it names a path
        raise LedgerUnreadable(
            f"site {site.name}: the privacy ledger cannot be read"
        ) from exc


def epsilon_or_none(site: SiteConfig) -> float | None:
    """:func:`spent_epsilon`, or None where the ledger cannot be read.

    For records written while the site is already refusing: the refusal must
    still be recorded and sent.
    """
    try:
        return spent_epsilon(site)
    except LedgerUnreadable:
        return None


# -- the installed folder against the approved bytes ----------------------------
def bundle_manifest(content: bytes) -> dict[str, str]:
    """SHA-256 of every file of a ``.fab`` (a zip), by its path inside it.

    Read from the archive's own bytes, not from the manifest the archive
    carries (``.info/CONTENT``, which Flower checks and does not install).

    Raises
    ------
    ValueError
        If the bytes are not a zip, or a name in it is absolute or climbs out
        of the folder (Flower refuses such a bundle too).
    """
    out: dict[str, str] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            for info in zf.infolist():
                name = PurePosixPath(info.filename)
                if info.is_dir() or name.parts[:1] == (FLOWER_MANIFEST_DIR,):
                    continue
                if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                    raise ValueError("the bundle holds a file outside its folder")
                out[name.as_posix()] = hashlib.sha256(zf.read(info)).hexdigest()
    except zipfile.BadZipFile as exc:
        raise ValueError("the bundle is not a zip archive") from exc
    return out


def _inert_bytecode(rel: PurePosixPath) -> bool:
    """A bytecode cache file Python wrote beside a module (never read by the gate)."""
    return (
        len(rel.parts) >= 2 and rel.parts[-2] == "__pycache__" and rel.suffix == ".pyc"
    )


def installed_differences(manifest: dict[str, str], folder: Path) -> list[str]:
    """How ``folder`` differs from the bundle ``manifest``: one line per file.

    A bundle file that is missing, unreadable, a link or has other bytes; any
    file or link the bundle does not hold, except a ``__pycache__/*.pyc``
    (Python's own cache from an earlier import, which the gate never reads).
    Empty when the folder holds exactly the approved bundle.
    """
    if folder.is_symlink() or not folder.is_dir():
        return [f"{folder}: not a folder"]
    problems: list[str] = []
    for rel, digest in sorted(manifest.items()):
        path = folder / rel
        try:
            if path.is_symlink() or not path.is_file():
                problems.append(f"{rel}: missing")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                problems.append(f"{rel}: content differs from the approved bundle")
        except OSError as exc:
            problems.append(f"{rel}: unreadable ({exc})")

    def unreadable(err: OSError) -> None:
        problems.append(f"{err.filename}: unreadable ({err.strerror})")

    for root, dirs, files in os.walk(folder, onerror=unreadable):  # links not followed
        here = Path(root)
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            rel = PurePosixPath((here / name).relative_to(folder).as_posix())
            if (here / name).is_symlink():
                problems.append(f"{rel}: a link, not a file of the bundle")
            elif rel.as_posix() not in manifest and not _inert_bytecode(rel):
                problems.append(f"{rel}: not in the approved bundle")
    return problems


def check_installed(
    site: SiteConfig, digest: str, content: bytes, folder: Path
) -> dict[str, str]:
    """Refuse unless ``folder`` holds exactly the approved bundle ``content``.

    Called after Flower installed the bundle (or found the folder already
    there) and before anything in it is imported. Returns the manifest
    (path inside the bundle to SHA-256), which the gate's importer checks
    again as it reads each module.

    Raises
    ------
    AppRefused
        Naming the hash and how many files differ, never a path; the files
        themselves go to the site's log.
    """
    try:
        manifest = bundle_manifest(content)
    except ValueError as exc:
        log.error("site %s: bundle sha256:%s: %s", site.name, digest, exc)
        raise AppRefused(
            f"site {site.name} refuses app bundle sha256:{digest}: it is not a "
            "readable app bundle"
        ) from None
    problems = installed_differences(manifest, folder)
    if problems:
        log.error(
            "site %s: the installed copy of app bundle sha256:%s at %s is not the "
            "approved bundle; inspect it, then delete the folder so Flower "
            "installs it again from the approved bytes:\n  %s",
            site.name,
            digest,
            folder,
            "\n  ".join(problems),
        )
        raise AppRefused(
            f"site {site.name} refuses app bundle sha256:{digest}: its installed "
            f"copy differs from the approved bundle in {len(problems)} file(s); "
            "see the site's log"
        )
    return manifest
