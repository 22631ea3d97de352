"""Run records: ``metrics.jsonl`` (one line per round) and terminal summaries."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from common import wire
from common.atomic import atomic_write_json
from common.regions import KITS_REGIONS
from server.reporting.round_record import RoundRecord
from server.reporting.text import safe_record, safe_text

METRICS_FILE = "metrics.jsonl"
START_FILE = "start-evaluation.json"  # the pretrained start, evaluated (round 0)
# Sites, and refusals, rejections and failures, one terminal line names; the
# rest are counted ("+3 more"), so a round with thousands of sites stays a line.
MAX_SITES_SHOWN = 24
_PER_SITE = ("train", "evaluate")  # site -> metric key -> number
_SITE_TEXT = ("refused", "rejected", "failed")  # site -> sentence
_SITE_NUMBER = ("epsilon", "weights", "update_norms")  # site -> number
_KEY_NUMBER = ("weighted", "spread")  # metric key -> number


def _is_number(v: Any) -> bool:
    return v is None or isinstance(v, int | float)


def _has_number(values: dict[str, Any], key: str) -> bool:
    """Whether ``values`` holds a number (not None, not absent) at ``key``."""
    return values.get(key) is not None and _is_number(values[key])


def safe_entry(entry: Any) -> dict[str, Any] | None:
    """A round entry every reader can show without checking it again; None if
    ``entry`` is no round (no whole-number ``round``).

    Site names, metric keys and texts pass :func:`~server.reporting.text.
    safe_record` (no control characters or escape codes, bounded lengths and
    counts; non-finite numbers are null, as JSON wants: a site without DP has
    epsilon = inf). The parts the terminal and the report read get their
    shapes: per-site metrics are numbers, reasons are text. A site's reply
    chose those names and values, and ``metrics.jsonl`` may come from an
    older coordinator, so they are never trusted to be either.
    """
    if not isinstance(entry, dict):
        return None
    rnd = entry.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd <= 2**31:
        return None
    out = safe_record(entry)
    for part in set(out) & set(_PER_SITE):
        out[part] = {
            site: {k: v for k, v in m.items() if _is_number(v)}
            for site, m in _mapping(out[part]).items()
            if isinstance(m, dict)
        }
    for part in set(out) & set(_SITE_TEXT):
        out[part] = {
            site: why if isinstance(why, str) else safe_text(why)
            for site, why in _mapping(out[part]).items()
        }
    for part in set(out) & {*_SITE_NUMBER, *_KEY_NUMBER}:
        out[part] = {k: v for k, v in _mapping(out[part]).items() if _is_number(v)}
    if "capped" in out:
        capped = out["capped"]
        out["capped"] = (
            [c for c in capped if isinstance(c, str)]
            if isinstance(capped, list)
            else []
        )
    return out


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


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
    entry["weighted"] = rec.eval_means()  # capped as the strategy's means are
    entry["spread"] = site_spread(rec.evaluate)
    entry["epsilon"] = {
        s: m.get(wire.EPSILON) for s, m in rec.train.items() if m.get(wire.DP_ENABLED)
    }
    safe = safe_entry(entry)
    if safe is None:
        raise ValueError(f"round {rec.round!r} is not a round number")
    return safe


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
    Every entry is a :func:`safe_entry`: whatever a line holds, its reader can
    show it.
    """
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    out = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        try:
            entry = safe_entry(json.loads(line))
        except (ValueError, RecursionError):  # torn, or nested past any parser
            continue
        if entry is not None:
            out.append(entry)
    return out


def _fmt(v: Any, width: int = 7, digits: int = 3) -> str:
    if not isinstance(v, int | float) or not math.isfinite(v):
        return "-".rjust(width)
    return f"{v:.{digits}f}".rjust(width)


def headline(entry: dict[str, Any]) -> tuple[str, tuple[str, ...], str, str]:
    """The task's headline metrics in a round entry: (title, keys, site key, label).

    Classification runs report balanced accuracy, accuracy and macro AUC;
    prognosis runs Harrell's and Uno's C-index and the integrated Brier
    score; segmentation runs Dice per KiTS region. A classification run is known by
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
    if (
        any(wire.SURVIVAL_SCORE.fullmatch(k) for k in keys)
        or wire.CASES_OUTCOME in keys
    ):
        surv = (wire.C_HARRELL, wire.C_UNO, wire.IBS)
        return "C-index Harrell/Uno, IBS", surv, wire.C_HARRELL, "C-index"
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
        entry = safe_entry(json.loads((run_dir / START_FILE).read_text()))
    except (OSError, ValueError, RecursionError):
        return None
    return entry if entry is not None and "evaluate" in entry else None


class SitePrivacy(NamedTuple):
    """What is known of a site's privacy spend at some round.

    ``dp`` is None when nothing is known (the site never answered a training
    request in the rounds read); ``epsilon`` is the cumulative epsilon of the
    site's last training reply (None with DP off or unknown); ``as_of`` is the
    round of that reply; ``note`` is empty when the site answered training in
    the round shown, else why it did not ("no reply", "refused", "rejected").
    """

    dp: bool | None
    epsilon: float | None
    delta: float | None
    as_of: int | None
    note: str = ""

    def epsilon_text(self, digits: int = 2) -> str:
        """``3.43``, ``off`` (the last reply said DP is off) or ``?`` (unknown)."""
        if self.dp is None:
            return "?"
        if not self.dp:
            return "off"
        return (
            _fmt(self.epsilon, 0, digits).strip() if self.epsilon is not None else "?"
        )

    def note_text(self) -> str:
        """``no reply; as of round 2``: why the epsilon shown is an older one."""
        if not self.note:
            return ""
        return self.note + (f"; as of round {self.as_of}" if self.as_of else "")


def _replied(entry: dict[str, Any], site: str) -> SitePrivacy | None:
    """The site's privacy from its training reply in ``entry``; None if it sent
    none. A site is known by its train metrics or its epsilon (entries written
    by hand or by older coordinators may carry only the latter)."""
    eps = entry.get("epsilon", {})
    train = entry.get("train", {})
    if site not in train and site not in eps:
        return None
    t = train.get(site, {})
    dp = site in eps or bool(t.get(wire.DP_ENABLED))
    delta = t.get(wire.DELTA, 0.0) if t else None
    return SitePrivacy(dp, eps.get(site) if dp else None, delta, entry["round"])


def last_known_privacy(entries: list[dict[str, Any]]) -> dict[str, SitePrivacy]:
    """Per site, its privacy as its latest training reply in ``entries`` said.

    A site that fails or refuses a round keeps its budget spent so far: its
    cumulative epsilon is the one it last reported, not "off" (it may be
    higher, if the lost round trained before the reply was lost; the site's
    own ledger has the exact figure).
    """
    known: dict[str, SitePrivacy] = {}
    for e in filter(None, map(safe_entry, entries)):
        for site in {*e.get("train", {}), *e.get("epsilon", {})}:
            p = _replied(e, site)
            if p is not None:
                known[site] = p
    return known


def site_privacy(
    entry: dict[str, Any], site: str, known: dict[str, SitePrivacy] | None = None
) -> SitePrivacy:
    """What the round ``entry`` shows of ``site``'s privacy: its reply's
    epsilon, or, when it sent no training reply this round, the last one
    ``known`` from earlier rounds with a note saying why (refused, rejected,
    no reply). ``eps=off`` is never shown for a site whose DP is on."""
    own = _replied(entry, site)
    if own is not None:
        return own
    why = "no reply"
    for kind in ("refused", "rejected"):
        if site in entry.get(kind, {}):
            why = kind
    last = (known or {}).get(site)
    if last is None:
        return SitePrivacy(None, None, None, None, why)
    return last._replace(note=why)


def round_lines(
    entries: list[dict[str, Any]], start: dict[str, Any] | None = None
) -> list[str]:
    """:func:`round_line` of the start (if any) and of every round, each with
    what earlier rounds said of sites that did not answer it."""
    lines = [round_line(start)] if start is not None else []
    known: dict[str, SitePrivacy] = {}
    for e in filter(None, map(safe_entry, entries)):
        lines.append(round_line(e, known))
        known = {**known, **last_known_privacy([e])}
    return lines


def round_line(
    entry: dict[str, Any], known: dict[str, SitePrivacy] | None = None
) -> str:
    """One line per round for the terminal: the task's headline metric per site
    (Dice, or balanced accuracy for classification) and epsilon per site; round
    0 is the starting model, before any training.

    A site without a training reply this round shows the epsilon ``known``
    from earlier rounds (:func:`last_known_privacy`) and why: ``eps=5.60 (no
    reply; as of round 2)``, or ``eps=?`` when nothing is known.

    Every name and reason in it is :func:`~server.reporting.text.safe_text`
    (no escape codes, bounded); at most :data:`MAX_SITES_SHOWN` sites and as
    many refusals are named, the rest counted.

    Raises
    ------
    ValueError
        If ``entry`` is not a round (no whole-number ``round``).
    """
    safe = safe_entry(entry)
    if safe is None:
        raise ValueError("not a round entry: no whole-number 'round'")
    entry = safe
    parts = ["start    " if entry["round"] == 0 else f"round {entry['round']:>3}"]
    w = entry.get("weighted", {})
    title, cols, site_key, label = headline(entry)
    parts.append(title + " " + "/".join(_fmt(w.get(c), 5).strip() for c in cols))
    if _has_number(w, "fp-rate-tumour"):  # tumour Dice: cases with a tumour
        parts.append(f"tumour FP {_fmt(w.get('fp-rate-tumour'), 0, 2)}")
    if _has_number(w, "lesion-sens-tumour"):  # lesion level (common.lesions)
        text = f"lesions {_fmt(w.get('lesion-sens-tumour'), 0, 2)}"
        if _has_number(w, "fp-lesions-tumour"):
            text += f" found, {_fmt(w.get('fp-lesions-tumour'), 0, 1)} FP/case"
        parts.append(text)
    sp = entry.get("spread", {})
    if any(c in sp for c in cols):
        parts.append("best-worst " + "/".join(_fmt(sp.get(c), 5).strip() for c in cols))
    start = entry["round"] == 0  # nothing trained yet: no epsilon, no aggregate
    sites = sorted(entry.get("evaluate", {}).items())
    for site, m in sites[:MAX_SITES_SHOWN]:
        eps_txt = "" if start else _eps_text(site_privacy(entry, site, known))
        if m.get(wire.METRICS_WITHHELD):
            parts.append(f"{site}: metrics withheld (site choice){eps_txt}")
        elif _is_number(m.get(site_key)) and site_key in m:
            parts.append(f"{site}: {label} {_fmt(m[site_key], 0)}{eps_txt}")
        else:
            parts.append(f"{site}: {label} n/a{eps_txt}")
    if len(sites) > MAX_SITES_SHOWN:
        parts.append(f"+{len(sites) - MAX_SITES_SHOWN} more sites")
    events = [
        (site, kind, why)
        for kind in _SITE_TEXT
        for site, why in entry.get(kind, {}).items()
    ]
    shown = {site for site, _ in sites[:MAX_SITES_SHOWN]}
    for site, kind, why in events[:MAX_SITES_SHOWN]:
        text = f"{site} {kind.upper()} ({safe_text(why, 80)})"
        if site not in shown and not start and site in (known or {}):
            text += _eps_text(site_privacy(entry, site, known))
        parts.append(text)
    if len(events) > MAX_SITES_SHOWN:
        parts.append(f"+{len(events) - MAX_SITES_SHOWN} more refused/rejected/failed")
    if not entry.get("aggregated", True) and not start:
        parts.append("NOT AGGREGATED")
    return " | ".join(parts)


def _eps_text(p: SitePrivacy) -> str:
    note = p.note_text()
    return f" eps={p.epsilon_text()}" + (f" ({note})" if note else "")


def summary_table(
    entries: list[dict[str, Any]], start: dict[str, Any] | None = None
) -> str:
    """Per-site and weighted table of the last round, with the starting
    model's metrics in brackets when the run has ``start`` (a pretrained
    start, :func:`read_start`), else the first round's."""
    safe = [e for e in map(safe_entry, entries) if e is not None]
    if not safe:
        return "no rounds completed"
    begin = safe_entry(start)
    first, last = begin or safe[0], safe[-1]
    cols = list(headline(last)[1])
    head = f"{'site':<16}" + "".join(f"{c:>14}" for c in cols)
    head += f"{'val cases':>10}{'epsilon':>9}{'delta':>9}"
    what = "the starting model" if begin else "first round"
    lines = [f"Summary after round {last['round']} ({what} in brackets)", head]
    known = last_known_privacy(safe[:-1])
    # a site that answered earlier but not the last round is still in the run
    sites = sorted(
        set(last.get("evaluate", {})) | set(last.get("train", {})) | set(known)
    )
    for site in sites[:MAX_SITES_SHOWN]:
        m = last.get("evaluate", {}).get(site, {})
        m0 = first.get("evaluate", {}).get(site, {})
        row = f"{site:<16}"
        for c in cols:
            row += f"{_fmt(m.get(c), 6)} ({_fmt(m0.get(c), 5).strip()})".rjust(14)
        p = site_privacy(last, site, known)
        row += _fmt(m.get(wire.NUM_VAL_CASES, 0), 10, 0)
        eps = p.epsilon if p.dp and p.epsilon is not None else None
        row += _fmt(eps, 9) if eps is not None else p.epsilon_text().rjust(9)
        row += f"{p.delta or 0:>9.0e}" if p.delta is not None else "-".rjust(9)
        if p.note:
            row += f"  {p.note_text()}"
        lines.append(row)
    if len(sites) > MAX_SITES_SHOWN:
        lines.append(f"+{len(sites) - MAX_SITES_SHOWN} more sites in metrics.jsonl")
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
