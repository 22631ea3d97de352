"""What a prognosis run shows: concordance, time-dependent AUC, Brier score,
calibration and Kaplan-Meier curves by predicted risk group (issue 30;
docs/prognosis.md).

Read from the run's own files: ``metrics.jsonl`` (each site's released
evaluation metrics and the coordinator's ``weighted`` entry, where scores are
means weighted by the patients with an outcome and life-table counts are
summed over sites), ``plan.json`` (the interval edges and horizons) and, when
a benchmark wrote one, ``prognosis-oracle.json`` (``{"site": C}``, the
generator's best achievable C-index; ``"all sites"`` for the pooled one).

Kaplan-Meier curves are drawn from counts only: per risk group (the site's
median predicted risk) and interval, the patients at risk at its start and the
events in it (:func:`common.survival.km_from_counts`). A site withholds every
count over fewer patients than its floor, so a curve stops at the first
interval whose at-risk count is absent. A number that is missing, not finite,
negative or inconsistent (more events than patients at risk) ends a curve or
shows as ``-``; a key a site did not send shows as withheld, never as 0.
No Flower; torch only through ``common.survival``, imported for prognosis
runs alone. The figure of the curves is drawn by
:mod:`server.reporting.survival_figure`.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import wire
from common.config import Plan
from server.reporting.survival_figure import MAX_KM_PANELS, Panel, km_section
from server.reporting.text import safe_text

ORACLE_FILE = "prognosis-oracle.json"
POOLED = "all sites"
WITHHELD = "withheld: below the site's floor"
NOT_POOLED = "not released by any site"
MAX_SITES_SHOWN = 24  # terminal lines, table rows
MAX_ROUND_ROWS = 20  # the latest rounds of the C-index table
MAX_HORIZONS = 4  # td-AUC columns
MAX_INTERVALS = 100  # life-table intervals read (the wire allows 2 digits)
MAX_ORACLE = 1000  # entries read of prognosis-oracle.json
MAX_COUNT = 10**9  # no federation has more patients: a larger count is junk
_DAYS = re.compile(r"(td-auc|cal-pred|cal-obs)-([0-9]{1,5})")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        v = float(v)
    except OverflowError:
        return None
    return v if math.isfinite(v) else None


def _count(v: Any) -> int | None:
    """A patient count: a whole number in [0, MAX_COUNT], else None."""
    x = _number(v)
    if x is None or x < 0 or x > MAX_COUNT or x != math.floor(x):
        return None
    return int(x)


def _mapping(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _sites(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A round's evaluation metrics per site (parts that are no mapping left out)."""
    return {
        str(s): m
        for s, m in _mapping(entry.get("evaluate")).items()
        if isinstance(m, dict)
    }


def is_prognosis_key(key: Any) -> bool:
    """Whether ``key`` is one of the prognosis metrics (``common.wire``)."""
    return isinstance(key, str) and (
        wire.SURVIVAL_SCORE.fullmatch(key) is not None
        or key in (wire.CASES_OUTCOME, wire.CASES_EVENT)
        or wire.ATRISK_KEY.fullmatch(key) is not None
        or wire.KM_EVENTS_KEY.fullmatch(key) is not None
    )


def prognosis_entries(entries: Sequence[Any]) -> list[dict[str, Any]]:
    """The round entries holding any prognosis metric, in order."""
    out = []
    for e in entries:
        if not isinstance(e, dict):
            continue
        parts = [_mapping(e.get("weighted")), *_sites(e).values()]
        if any(is_prognosis_key(k) for m in parts for k in m):
            out.append(e)
    return out


def _days(value: Any) -> tuple[float, ...] | None:
    if not isinstance(value, list | tuple) or not 0 < len(value) <= MAX_INTERVALS:
        return None
    days = [d for v in value if (d := _number(v)) is not None and d > 0]
    if len(days) != len(value):
        return None
    if any(b <= a for a, b in zip(days, days[1:], strict=False)):
        return None
    return tuple(days)


def plan_days(run_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The run's interval edges and horizons in days (``plan.json``; the plan's
    defaults where it is absent or does not hold valid ones)."""
    try:
        plan = _mapping(json.loads((Path(run_dir) / "plan.json").read_text()))
    except (OSError, ValueError, RecursionError):
        plan = {}
    default = Plan()
    edges = _days(plan.get("survival-edges-days")) or default.survival_edges_days
    horizons = _days(plan.get("survival-horizons-days"))
    if horizons is None or horizons[-1] > edges[-1]:
        horizons = tuple(h for h in default.survival_horizons_days if h <= edges[-1])
    return edges, horizons or (edges[-1],)


def read_oracle(run_dir: Path) -> dict[str, float]:
    """``prognosis-oracle.json``: the best achievable C-index per site (finite
    numbers only), or {} when there is none."""
    try:
        data = json.loads((Path(run_dir) / ORACLE_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return {
        str(s): c
        for s, v in list(_mapping(data).items())[:MAX_ORACLE]
        if (c := _number(v)) is not None
    }


def life_table(
    metrics: dict[str, Any], group: str, intervals: int
) -> tuple[list[int], list[int]]:
    """At-risk and event counts of one risk group, up to the first interval
    whose counts are absent or unusable (no patient at risk, more events than
    patients, not a count)."""
    atrisk: list[int] = []
    events: list[int] = []
    for k in range(min(intervals, MAX_INTERVALS)):
        n = _count(metrics.get(wire.atrisk_key(group, k)))
        d = _count(metrics.get(wire.km_events_key(group, k)))
        if n is None or n == 0 or d is None or d > n:
            break
        atrisk.append(n)
        events.append(d)
    return atrisk, events


def km_curve(
    metrics: dict[str, Any], group: str, intervals: int
) -> tuple[list[float], list[int]]:
    """Kaplan-Meier survival at the end of each interval with counts, and the
    patients at risk at each interval's start."""
    atrisk, events = life_table(metrics, group, intervals)
    if not atrisk:
        return [], []
    # Imported here: common.survival needs torch, which no other report does.
    from common.survival import km_from_counts

    try:
        curve = km_from_counts(atrisk, events)
    except ValueError:  # life_table keeps such counts out; never fail a report
        return [], []
    return curve, atrisk[: len(curve)]


def _horizon_index(edges: Sequence[float], horizon: float) -> int:
    """The last edge at or before ``horizon`` (-1: before the first)."""
    return sum(1 for e in edges if e <= horizon) - 1


def _fmt(v: Any, digits: int = 2) -> str:
    x = _number(v)
    return "n/a" if x is None else f"{x:.{digits}f}"


def _count_text(v: Any) -> str:
    n = _count(v)
    return "n/a" if n is None else str(n)


def _km_text(
    metrics: dict[str, Any],
    edges: Sequence[float],
    horizon: float,
    absent: str = WITHHELD,
) -> str:
    """Kaplan-Meier survival of each risk group at the last edge by ``horizon``;
    ``absent`` for a group whose curve stops before it."""
    k = _horizon_index(edges, horizon)
    if k < 0:
        return f"no interval ends by {horizon:g} d"
    at = {}
    for g in wire.RISK_GROUPS:
        curve, _ = km_curve(metrics, g, len(edges))
        at[g] = f"{curve[k]:.2f}" if len(curve) > k else None
    if not any(at.values()):
        return f"event-free at {edges[k]:g} d {absent}"
    parts = [f"{g} {v or absent}" for g, v in at.items()]
    return f"event-free at {edges[k]:g} d: " + ", ".join(parts)


def _score_days(metrics: list[dict[str, Any]]) -> tuple[list[int], int | None]:
    """The td-AUC horizons (at most :data:`MAX_HORIZONS`) and the calibration
    horizon found among the keys of ``metrics``."""
    auc, cal = set(), set()
    for m in metrics:
        for key in m:
            if isinstance(key, str) and (match := _DAYS.fullmatch(key)):
                (auc if match[1] == "td-auc" else cal).add(int(match[2]))
    return sorted(auc)[:MAX_HORIZONS], max(cal) if cal else None


def _scores_text(m: dict[str, Any], auc_days: list[int], cal: int | None) -> str:
    text = (
        f"C-index Harrell {_fmt(m.get(wire.C_HARRELL))}, Uno {_fmt(m.get(wire.C_UNO))}"
    )
    if auc_days:
        aucs = [f"{d} d {_fmt(m.get(f'{wire.TD_AUC_PREFIX}{d}'))}" for d in auc_days]
        text += "; td-AUC " + ", ".join(aucs)
    text += f"; IBS {_fmt(m.get(wire.IBS), 3)}"
    if cal is not None:
        text += (
            f"; calibration at {cal} d: predicted "
            f"{_fmt(m.get(f'{wire.CAL_PRED_PREFIX}{cal}'))}, observed "
            f"{_fmt(m.get(f'{wire.CAL_OBS_PREFIX}{cal}'))}"
        )
    return text


def _site_text(
    m: dict[str, Any], edges: Sequence[float], horizon: float, oracle: float | None
) -> str:
    if m.get(wire.METRICS_WITHHELD):
        return "metrics withheld (site choice)"
    if not any(is_prognosis_key(k) for k in m):
        return WITHHELD
    uno = _fmt(m[wire.C_UNO]) if wire.C_UNO in m else "withheld"
    c = (
        f"C-index {_fmt(m[wire.C_HARRELL])} (Uno {uno})"
        if wire.C_HARRELL in m
        else f"C-index {WITHHELD}"
    )
    if oracle is not None:
        c += f", best achievable {oracle:.2f}"
    if wire.CASES_EVENT in m and wire.CASES_OUTCOME in m:
        ev = f"{_count_text(m[wire.CASES_EVENT])} events among "
        ev += f"{_count_text(m[wire.CASES_OUTCOME])} patients"
    else:
        ev = f"events {WITHHELD}"
    return f"{c}; {ev}; {_km_text(m, edges, horizon)}"


def survival_lines(run_dir: Path, entries: list[dict[str, Any]]) -> list[str]:
    """Terminal lines after a prognosis run ([] for the other tasks).

    The last round with prognosis metrics: the pooled C-index (Harrell, Uno),
    td-AUC per horizon, integrated Brier score and calibration; the pooled
    Kaplan-Meier survival of the low- and high-risk groups at the plan's last
    horizon; per site its C-index, events and Kaplan-Meier survival, or that
    it withheld them.
    """
    prog = prognosis_entries(entries)
    if not prog:
        return []
    last = prog[-1]
    edges, horizons = plan_days(run_dir)
    weighted = _mapping(last.get("weighted"))
    sites = sorted(_sites(last).items())
    auc_days, cal = _score_days([weighted, *(m for _, m in sites)])
    oracle = read_oracle(run_dir)
    lines = [
        f"Round {_fmt(last.get('round'), 0)}, prognosis (all sites): "
        + _scores_text(weighted, auc_days, cal),
        "Kaplan-Meier by predicted risk (all sites): "
        + _km_text(weighted, edges, horizons[-1], NOT_POOLED),
    ]
    if POOLED in oracle:
        lines.append(f"Best achievable C-index (all sites): {oracle[POOLED]:.2f}")
    for site, m in sites[:MAX_SITES_SHOWN]:
        text = _site_text(m, edges, horizons[-1], oracle.get(site))
        lines.append(f"  {safe_text(site, 64)}: {text}")
    if len(sites) > MAX_SITES_SHOWN:
        lines.append(f"  +{len(sites) - MAX_SITES_SHOWN} more sites")
    return lines


# -- the report section --------------------------------------------------------


def _cell(m: dict[str, Any], key: str, absent: str, digits: int = 3) -> str:
    """A score (``digits`` > 0) or a count (0) of ``m``: ``absent`` where the
    key was not sent, ``-`` where its value is no finite score or count."""
    if key not in m:
        return absent
    if digits == 0:
        n = _count(m[key])
        return "-" if n is None else str(n)
    x = _number(m[key])
    return "-" if x is None else f"{x:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
    out += "</tr>"
    for row in rows:
        out += "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
    return out + "</table>"


def _scores_table(
    last: dict[str, Any], oracle: dict[str, float], auc_days: list[int], cal: int | None
) -> str:
    keys = [(wire.C_HARRELL, 3), (wire.C_UNO, 3)]
    keys += [(f"{wire.TD_AUC_PREFIX}{d}", 3) for d in auc_days]
    keys.append((wire.IBS, 3))
    head = ["site", "C Harrell", "C Uno", *(f"td-AUC {d} d" for d in auc_days), "IBS"]
    if cal is not None:
        keys += [
            (f"{wire.CAL_PRED_PREFIX}{cal}", 3),
            (f"{wire.CAL_OBS_PREFIX}{cal}", 3),
        ]
        head += [f"predicted S({cal} d)", f"observed S({cal} d)"]
    keys += [(wire.CASES_OUTCOME, 0), (wire.CASES_EVENT, 0)]
    head += ["patients", "events"]
    if oracle:
        head.append("best achievable C")
    rows = []
    sites = sorted(_sites(last).items())[:MAX_SITES_SHOWN]
    for name, m, absent in [
        *((s, m, "withheld") for s, m in sites),
        (POOLED, _mapping(last.get("weighted")), "-"),
    ]:
        if m.get(wire.METRICS_WITHHELD) and name != POOLED:
            m, absent = {}, "withheld (site choice)"
        row = [safe_text(name, 64), *(_cell(m, k, absent, d) for k, d in keys)]
        if oracle:
            row.append(_fmt(oracle[name], 3) if name in oracle else "-")
        rows.append(row)
    return _table(head, rows)


def _rounds_table(prog: list[dict[str, Any]]) -> str:
    keys = [(wire.C_HARRELL, 3), (wire.C_UNO, 3), (wire.IBS, 3), (wire.CASES_EVENT, 0)]
    rows = [
        [_fmt(e.get("round"), 0)]
        + [_cell(_mapping(e.get("weighted")), k, "-", d) for k, d in keys]
        for e in prog[-MAX_ROUND_ROWS:]
    ]
    return _table(["round", "C Harrell", "C Uno", "IBS", "events"], rows)


def _km_panels(
    last: dict[str, Any], edges: Sequence[float]
) -> tuple[list[Panel], list[str], list[str]]:
    """The figure's panels (all sites first, then at most :data:`MAX_KM_PANELS`
    sites), the sites without a curve and those not drawn."""

    def curves(m: dict[str, Any]) -> dict[str, tuple[list[float], list[int]]]:
        return {g: km_curve(m, g, len(edges)) for g in wire.RISK_GROUPS}

    pooled = curves(_mapping(last.get("weighted")))
    panels: list[Panel] = (
        [(POOLED, pooled)] if any(c for c, _ in pooled.values()) else []
    )
    none, skipped = [], []
    drawn = 0
    for name, m in sorted(_sites(last).items()):
        site = curves(m)
        if not any(c for c, _ in site.values()):
            none.append(name)
        elif drawn < MAX_KM_PANELS:
            panels.append((name, site))
            drawn += 1
        else:
            skipped.append(name)
    return panels, none, skipped


def survival_html(run_dir: Path, entries: list[dict[str, Any]]) -> str:
    """The report's "Prognosis" section ("" for the other tasks).

    The last round's scores per site and pooled (with the generator's best
    achievable C-index when ``prognosis-oracle.json`` is there), the pooled
    C-index over rounds, and Kaplan-Meier curves by predicted risk group,
    pooled and per site, from the released counts only.
    """
    prog = prognosis_entries(entries)
    if not prog:
        return ""
    last = prog[-1]
    edges, horizons = plan_days(run_dir)
    sites = _sites(last)
    auc_days, cal = _score_days([_mapping(last.get("weighted")), *sites.values()])
    oracle = read_oracle(run_dir)
    body = [
        '<h2 id="prognosis">Prognosis</h2>',
        f'<p class="note">Round {html.escape(_fmt(last.get("round"), 0))}. '
        "Harrell's and Uno's C-index, the time-dependent AUC at each horizon, the "
        "integrated Brier score (IBS, lower is better) and calibration (mean "
        "predicted vs Kaplan-Meier event-free survival) on each site's validation "
        "patients with an outcome. All sites: scores are means weighted by those "
        "patients, counts are sums. A site releases each number only over at "
        "least its floor of patients and events; 'withheld' is a number it did "
        "not release, '-' one that is not defined (docs/prognosis.md).</p>",
        _scores_table(last, oracle, auc_days, cal),
        "<h3>C-index over rounds (all sites)</h3>",
        _rounds_table(prog),
    ]
    panels, none, skipped = _km_panels(last, edges)
    pooled_km = _km_text(
        _mapping(last.get("weighted")), edges, horizons[-1], NOT_POOLED
    )
    body += km_section(run_dir, panels, none, skipped, edges, pooled_km)
    return "\n".join(body)
