"""``kidneyfl coordinator status``: the consortium's view of its sites.

Two sources, joined by site:

- the SuperLink's node listing (``flwr supernode list <connection> --format
  json``): every registered node and whether it is online now;
- the run's files: ``status.json`` (which node is which site, when Flower knows
  registered names) and ``metrics.jsonl`` (per site: the last round it trained,
  its last refusal and why, its cumulative epsilon).

Either source may be missing (no run yet, SuperLink unreachable); the table
says so rather than failing. Site names and refusal reasons are the sites'
own text: every cell passes :func:`server.reporting.text.safe_text`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from server.reporting.metrics_log import read_metrics, safe_entry
from server.reporting.status import read_status
from server.reporting.text import NAME_LIMIT, TEXT_LIMIT, safe_text


class ListingError(RuntimeError):
    """The SuperLink's node listing could not be read."""


def list_supernodes(
    connection: str, flwr_home: Path | None = None, flwr_bin: str | None = None
) -> list[dict[str, Any]]:
    """The SuperLink's nodes (``node-id``, ``status``, ...) via Flower's CLI.

    Raises
    ------
    ListingError
        If ``flwr`` fails or prints no JSON listing (the message says why).
    """
    flwr = flwr_bin or str(Path(sys.executable).parent / "flwr")
    env = dict(os.environ)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    cmd = [flwr, "supernode", "list", connection, "--format", "json"]
    try:
        res = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ListingError(f"`{' '.join(cmd)}` did not run: {exc}") from None
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        doc = {}
    if res.returncode != 0 or not doc.get("success", False):
        why = (doc.get("error-message") or res.stderr or res.stdout).strip()
        # Flower's own message does not say where it looked for the connection.
        fix = missing_connection(connection, env.get("FLWR_HOME")) or (
            f"check the connection with `kidneyfl coordinator connect {connection} ...`"
        )
        raise ListingError(
            f"`flwr supernode list {connection}` failed: {why[-300:]}; {fix}"
        )
    return list(doc.get("nodes", []))


def flower_home(flwr_home: str | None = None) -> Path:
    """Where the ``flwr`` CLI keeps its connections: ``FLWR_HOME``, else
    Flower's default ``~/.flwr``."""
    return Path(flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def missing_connection(connection: str, flwr_home: str | None = None) -> str:
    """Why ``flwr`` will not find ``connection``, with the fix; "" if it will."""
    import tomllib

    home = flower_home(flwr_home)
    config = home / "config.toml"
    try:
        links = tomllib.loads(config.read_text()).get("superlink", {})
    except (OSError, ValueError):
        links = {}
    if connection in links:
        return ""
    where = "FLWR_HOME" if flwr_home or os.environ.get("FLWR_HOME") else "default"
    return (
        f"connection {connection!r} is not in {config} (the {where} Flower home); "
        f"run `kidneyfl coordinator connect {connection} --address HOST:PORT "
        "--root-certificates CA.CRT` as this user, or, if it was written "
        "elsewhere, `export FLWR_HOME=<that folder>` in this shell (the folder "
        "`kidneyfl coordinator connect` printed)"
    )


def site_rows(
    nodes: list[dict[str, Any]] | None,
    entries: list[dict[str, Any]],
    node_names: dict[str, str],
) -> list[dict[str, Any]]:
    """One row per site (or unnamed node): node, online, last round, refusal,
    epsilon. ``nodes`` None means the SuperLink was not asked or not reached."""
    rows: dict[str, dict[str, Any]] = {}

    def row(site: str) -> dict[str, Any]:
        return rows.setdefault(
            site,
            {
                "site": site,
                "node": "-",
                "superlink": "?" if nodes is None else "not registered",
                "last_round": None,
                "epsilon": None,
                "last_refusal": None,
            },
        )

    for node in nodes or []:
        if not isinstance(node, dict):
            continue
        node_id = safe_text(node.get("node-id"), NAME_LIMIT)
        name = node_names.get(node_id)
        r = row(safe_text(name, NAME_LIMIT) if name else f"node {node_id}")
        r["node"], r["superlink"] = node_id, safe_text(node.get("status", "?"), 40)
        r["superlink"] += _since(node)
    for e in filter(None, map(safe_entry, entries)):
        rnd = int(e["round"])
        for site in e.get("train", {}):
            row(site)["last_round"] = rnd
        for site, eps in e.get("epsilon", {}).items():
            row(site)["epsilon"] = eps
        for kind in ("refused", "rejected", "failed"):
            for site, why in e.get(kind, {}).items():
                row(site)["last_refusal"] = f"round {rnd} {kind}: {why}"[:TEXT_LIMIT]
    return sorted(rows.values(), key=lambda r: r["site"])


def _since(node: dict[str, Any]) -> str:
    """The text `` since <time>``: when the SuperLink saw the node come online or
    marked it offline (Flower 1.42 marks a silent node offline after two
    missed 30 s heartbeats, so within about 60 s)."""
    key = {"online": "online-at", "offline": "offline-at"}.get(node.get("status"))
    when = node.get(key) if key else None
    if not isinstance(when, str) or not when:
        return ""
    return f" since {safe_text(when.replace('T', ' ')[:19], 19)}"


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table for the terminal."""
    head = ("site", "node", "SuperLink", "last round", "epsilon", "last refusal")
    body = [
        (
            r["site"],
            r["node"],
            r["superlink"],
            "-" if r["last_round"] is None else str(r["last_round"]),
            f"{r['epsilon']:.2f}" if isinstance(r["epsilon"], int | float) else "-",
            r["last_refusal"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head) - 1)]
    lines = []
    for cells in [head, *body]:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))
            + "  "
            + cells[-1]
        )
    return "\n".join(lines)


def coordinator_status(
    run_dir: Path | None,
    connection: str | None,
    flwr_home: Path | None = None,
    flwr_bin: str | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The status text for the terminal, and the rows it shows."""
    lines, nodes = [], None
    if connection:
        try:
            nodes = list_supernodes(connection, flwr_home, flwr_bin)
            online = sum(n.get("status") == "online" for n in nodes)
            lines.append(
                f"SuperLink {connection}: {len(nodes)} node(s), {online} online"
            )
        except ListingError as exc:
            lines.append(f"SuperLink {connection}: not reachable ({exc})")
    entries, names = [], {}
    if run_dir is not None:
        from server.reporting.status import status_line

        status = read_status(run_dir)
        entries = read_metrics(run_dir)
        names = {str(k): str(v) for k, v in status.get("nodes", {}).items()}
        lines.append(f"run {Path(run_dir).name}: {status_line(status)}")
    rows = site_rows(nodes, entries, names)
    lines.append(format_rows(rows) if rows else "no sites registered or seen yet")
    return "\n".join(lines), rows
