"""Run records: ``metrics.jsonl`` (one line per round) and terminal summaries."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import wire
from common.atomic import atomic_write_json
from common.metrics import KITS_REGIONS
from server.reporting.round_record import RoundRecord, weighted_eval_means

METRICS_FILE = "metrics.jsonl"
START_FILE = "start-evaluation.json"  # the pretrained start, evaluated (round 0)


def _clean(obj: Any) -> Any:
    # JSON has no Infinity/NaN: a site without DP has epsilon = inf -> null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


# Evaluation values that are counts, not scores: no best-worst spread for them.
_NOT_SCORES = (wire.NUM_VAL_CASES, wire.NUM_EXAMPLES, wire.REFUSED)


def site_spread(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Best minus worst site for every evaluation metric (NaN values ignored).

    Confusion-matrix counts (``cm-i-j``) and case counts are not scores and
    get no spread.
    """
    keys = sorted({k for m in per_site.values() for k in m})
    out = {}
    for key in keys:
        if key in _NOT_SCORES or key.startswith("cm-"):
            continue
        vals = [
            float(m[key])
            for m in per_site.values()
            if key in m and isinstance(m[key], int | float) and math.isfinite(m[key])
        ]
        if vals:
            out[key] = max(vals) - min(vals)
    return out


def round_entry(rec: RoundRecord) -> dict[str, Any]:
    """The ``metrics.jsonl`` line for a round: per site, weighted mean, and the
    best-worst site spread of every evaluation metric."""
    entry = asdict(rec)
    entry["weighted"] = weighted_eval_means(rec.evaluate)
    entry["spread"] = site_spread(rec.evaluate)
    entry["epsilon"] = {
        s: m.get(wire.EPSILON) for s, m in rec.train.items() if m.get(wire.DP_ENABLED)
    }
    return _clean(entry)


def append_metrics(run_dir: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line durably (a crash never leaves a half-written line)."""
    path = run_dir / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The round lines of a run's ``metrics.jsonl``, in order.

    A torn last line is ignored, and so are lines that are not rounds (the
    privacy audit of ``simulate --audit-canaries`` is appended after them).
    """
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "round" in entry:
            out.append(entry)
    return out


def _fmt(v: Any, width: int = 7) -> str:
    if v is None:
        return "-".rjust(width)
    return f"{v:.3f}".rjust(width)


def headline(entry: dict[str, Any]) -> tuple[str, tuple[str, ...], str, str]:
    """The task's headline metrics in a round entry: (title, keys, site key, label).

    Classification runs report balanced accuracy, accuracy and macro AUC;
    segmentation runs Dice per KiTS region. A classification run is known by
    any of its keys, not by balanced accuracy alone: a site withholds that
    when a class has fewer patients than its floor (``client.disclosure``).
    """
    keys = set(entry.get("weighted", {}))
    for m in entry.get("evaluate", {}).values():
        keys |= set(m)
    dice = tuple(wire.dice_key(r) for r in KITS_REGIONS)
    cls_keys = {wire.BALANCED_ACCURACY, wire.ACCURACY, wire.AUC_MACRO}
    classification = keys & cls_keys or any(
        k.startswith((wire.RECALL_PREFIX, wire.CONFUSION_PREFIX)) for k in keys
    )
    if classification and not keys & set(dice):
        cls = (wire.BALANCED_ACCURACY, wire.ACCURACY, wire.AUC_MACRO)
        return "balanced-acc/acc/auc", cls, wire.BALANCED_ACCURACY, "bal-acc"
    return "Dice kidney/masses/tumour", dice, wire.dice_key("kidney"), "kidney"


def write_start(run_dir: Path, rec: RoundRecord) -> dict[str, Any]:
    """Write ``start-evaluation.json``: the starting model (a pretrained
    ``initial-checkpoint``) evaluated at every site before round 1, what the
    federation's gain is measured against. Returns its entry (round 0)."""
    entry = round_entry(rec)
    entry["time"] = time.time()
    atomic_write_json(run_dir / START_FILE, entry)
    return entry


def read_start(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``start-evaluation.json``, or None (no pretrained start, or
    an unreadable file: the summary then compares with round 1)."""
    try:
        entry = json.loads((run_dir / START_FILE).read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and "evaluate" in entry else None


def round_line(entry: dict[str, Any]) -> str:
    """One line per round for the terminal: the task's headline metric per site
    (Dice, or balanced accuracy for classification) and epsilon per site; round
    0 is the starting model, before any training."""
    parts = ["start    " if entry["round"] == 0 else f"round {entry['round']:>3}"]
    w = entry.get("weighted", {})
    title, cols, site_key, label = headline(entry)
    parts.append(title + " " + "/".join(_fmt(w.get(c), 5).strip() for c in cols))
    if "fp-rate-tumour" in w:  # tumour Dice covers cases with a tumour only
        parts.append(f"tumour FP {w['fp-rate-tumour']:.2f}")
    sp = entry.get("spread", {})
    if any(c in sp for c in cols):
        parts.append("best-worst " + "/".join(_fmt(sp.get(c), 5).strip() for c in cols))
    start = entry["round"] == 0  # nothing trained yet: no epsilon, no aggregate
    for site, m in sorted(entry.get("evaluate", {}).items()):
        eps = entry.get("epsilon", {}).get(site)
        eps_txt = f" eps={eps:.2f}" if eps is not None else " eps=off"
        eps_txt = "" if start else eps_txt
        if m.get(wire.METRICS_WITHHELD):
            parts.append(f"{site}: metrics withheld (site choice){eps_txt}")
        elif site_key in m:
            parts.append(f"{site}: {label} {m[site_key]:.3f}{eps_txt}")
        else:
            parts.append(f"{site}: {label} n/a{eps_txt}")
    for kind in ("refused", "rejected", "failed"):
        for site, why in entry.get(kind, {}).items():
            parts.append(f"{site} {kind.upper()} ({why[:80]})")
    if not entry.get("aggregated", True) and not start:
        parts.append("NOT AGGREGATED")
    return " | ".join(parts)


def summary_table(
    entries: list[dict[str, Any]], start: dict[str, Any] | None = None
) -> str:
    """Per-site and weighted table of the last round, with the starting
    model's metrics in brackets when the run has ``start`` (a pretrained
    start, :func:`read_start`), else the first round's."""
    if not entries:
        return "no rounds completed"
    first, last = start or entries[0], entries[-1]
    cols = list(headline(last)[1])
    head = f"{'site':<16}" + "".join(f"{c:>14}" for c in cols)
    head += f"{'val cases':>10}{'epsilon':>9}{'delta':>9}"
    what = "the starting model" if start else "first round"
    lines = [f"Summary after round {last['round']} ({what} in brackets)", head]
    sites = sorted(set(last.get("evaluate", {})) | set(last.get("train", {})))
    for site in sites:
        m = last.get("evaluate", {}).get(site, {})
        m0 = first.get("evaluate", {}).get(site, {})
        t = last.get("train", {}).get(site, {})
        row = f"{site:<16}"
        for c in cols:
            row += f"{_fmt(m.get(c), 6)} ({_fmt(m0.get(c), 5).strip()})".rjust(14)
        eps = last.get("epsilon", {}).get(site)
        row += f"{int(m.get(wire.NUM_VAL_CASES, 0)):>10}"
        row += f"{_fmt(eps, 9) if eps is not None else 'off'.rjust(9)}"
        row += f"{t.get(wire.DELTA, 0) or 0:>9.0e}" if t else "-".rjust(9)
        lines.append(row)
    w, w0 = last.get("weighted", {}), first.get("weighted", {})
    row = f"{'weighted mean':<16}"
    for c in cols:
        row += f"{_fmt(w.get(c), 6)} ({_fmt(w0.get(c), 5).strip()})".rjust(14)
    lines.append(row)
    sp = last.get("spread", {})
    if sp:
        lines.append(
            f"{'best-worst':<16}"
            + "".join(f"{_fmt(sp.get(c), 6)}".rjust(14) for c in cols)
        )
    return "\n".join(lines)
