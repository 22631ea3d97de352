"""``kidneyfl simulate --audit-canaries N``: the glue between the coordinator's
simulation and the site-side canary audit (``client/canary_cases.py``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("kidneyfl")


def audit_prepare(site_paths: list[Path], n: int, run_dir: Path) -> list[Path]:
    """Write N canary patients for the first site; the site YAMLs to simulate."""
    # imported here: torch and MONAI are not needed for `kidneyfl --help`
    from client.canary_cases import prepare_canary_sites

    return prepare_canary_sites(site_paths, n, run_dir)


def audit_finish(run_dir: Path) -> str:
    """Score the canaries, write ``privacy-audit.json`` and redraw the report
    (which shows the audit); the line to print."""
    from client.canary_cases import finish_canary_audit, format_canary_audit
    from server.deliver import report

    path = finish_canary_audit(run_dir)
    result = json.loads(path.read_text())
    # the run's record holds it too: one line after the rounds, with no "round"
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"privacy_audit": result}, default=str) + "\n")
    try:
        report(run_dir)
    except Exception:  # noqa: BLE001 - the audit is written; `kidneyfl report` retries
        log.exception("redrawing the report failed; `kidneyfl report` retries")
    return f"{format_canary_audit(result)}\n({path})"
