"""The prognosis section of the run's lines and report (issue 30).

A tiny run folder of two rounds and three sites, written as the coordinator
writes it (``round_entry`` + ``append_metrics``): site ``a`` releases its whole
life table, the hostile-named site releases part of it (its high-risk group
falls below its floor after interval 2), site ``c`` releases nothing. The
Kaplan-Meier numbers are computed here by hand from the summed counts.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re

import pytest

from common import wire
from common.config import Plan
from server.reporting.html import write_report
from server.reporting.metrics_log import append_metrics, read_metrics, round_entry
from server.reporting.round_record import RoundRecord
from server.reporting.survival import (
    ORACLE_FILE,
    km_curve,
    plan_days,
    survival_html,
    survival_lines,
)
from server.reporting.survival_figure import FIGURE

HOSTILE = "<script>alert(1)</script>"
# (at risk at each interval's start, events in it), per risk group
A_TABLE = {
    "low": ([20, 18, 15, 12, 10, 8], [1, 2, 2, 1, 1, 0]),
    "high": ([20, 16, 12, 8, 6, 5], [3, 3, 3, 2, 1, 0]),
}
B_TABLE = {  # withheld past: low interval 3, high interval 2
    "low": ([10, 9, 8, 7], [0, 1, 0, 1]),
    "high": ([10, 8, 6], [2, 2, 1]),
}


def _table(table: dict[str, tuple[list[int], list[int]]]) -> dict[str, float]:
    out = {}
    for g, (atrisk, events) in table.items():
        for k, (n, d) in enumerate(zip(atrisk, events, strict=True)):
            out[wire.atrisk_key(g, k)] = float(n)
            out[wire.km_events_key(g, k)] = float(d)
    return out


def _site_a(c: float) -> dict[str, float]:
    scores = {"c-harrell": c, "c-uno": 0.6, "td-auc-365": 0.7, "td-auc-1095": 0.72}
    scores |= {"ibs": 0.15, "cal-pred-1095": 0.7, "cal-obs-1095": 0.66}
    counts = {"cases-outcome": 40.0, "cases-event": 14.0, "num-val-cases": 40.0}
    return scores | counts | _table(A_TABLE)


def _site_b() -> dict[str, float]:
    counts = {"cases-outcome": 20.0, "cases-event": 6.0, "num-val-cases": 20.0}
    return {"c-harrell": 0.6} | counts | _table(B_TABLE)


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    for r, c in ((1, 0.65), (2, 0.7)):
        rec = RoundRecord(round=r, aggregated=True)
        rec.evaluate = {
            "a": _site_a(c),
            HOSTILE: _site_b(),
            "c": {"num-val-cases": 4.0},
        }
        append_metrics(run, round_entry(rec))
    plan = Plan().model_dump(by_alias=True, mode="json")
    (run / "plan.json").write_text(json.dumps(plan))
    return run


def _km(atrisk: list[int], events: list[int]) -> float:
    return math.prod(1 - d / n for n, d in zip(atrisk, events, strict=True))


def test_lines_show_the_pooled_c_index_and_km_separation_from_the_counts(run):
    lines = survival_lines(run, read_metrics(run))
    text = "\n".join(lines)
    # C: means weighted by patients with an outcome, (0.7 * 40 + 0.6 * 20) / 60
    assert "C-index Harrell 0.67, Uno 0.60" in lines[0]
    assert "td-AUC 365 d 0.70, 1095 d 0.72" in lines[0]
    assert "calibration at 1095 d: predicted 0.70, observed 0.66" in lines[0]
    # 1095 d is the end of interval 3; pooled counts summed over a and b,
    # b's high-risk group contributing up to its last released interval only
    low = _km([30, 27, 23, 19], [1, 3, 2, 2])
    high = _km([30, 24, 18, 8], [5, 5, 4, 2])
    assert low > high + 0.2
    assert lines[1] == (
        "Kaplan-Meier by predicted risk (all sites): event-free at 1095 d: "
        f"low {low:.2f}, high {high:.2f}"
    )
    a = next(x for x in lines if x.strip().startswith("a:"))
    assert "C-index 0.70 (Uno 0.60)" in a and "14 events among 40 patients" in a
    a_low = _km(A_TABLE["low"][0][:4], A_TABLE["low"][1][:4])
    assert f"low {a_low:.2f}" in a
    assert "high withheld: below the site's floor" in text  # site b's high group


def test_a_site_that_released_nothing_is_withheld_not_zero(run):
    lines = survival_lines(run, read_metrics(run))
    c = next(x for x in lines if x.strip().startswith("c:"))
    assert c.strip() == "c: withheld: below the site's floor"
    section = survival_html(run, read_metrics(run))
    row = re.search(r"<tr><td>c</td>(.*?)</tr>", section)
    assert row is not None
    cells = re.findall(r"<td>(.*?)</td>", row[1])
    assert cells and set(cells) == {"withheld"}


def test_the_section_has_the_figure_and_escapes_site_names(run):
    section = survival_html(run, read_metrics(run))
    assert section.startswith('<h2 id="prognosis">Prognosis</h2>')
    assert "<script" not in section
    assert html.escape(HOSTILE) in section
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', section)
    assert len(pngs) == 1 and base64.b64decode(pngs[0])[:4] == b"\x89PNG"
    assert (run / "report" / FIGURE).read_bytes() == base64.b64decode(pngs[0])
    assert "fewer than the site's floor of patients remain at risk" in section
    # the C-index over rounds, pooled: round 1 and round 2
    assert "<td>1</td><td>0.633</td>" in section
    assert "<td>2</td><td>0.667</td>" in section
    assert "No Kaplan-Meier curve" in section and "at risk): c." in section


def test_the_report_holds_the_section(run):
    page = write_report(run).read_text()
    assert 'id="prognosis"' in page and "<script>alert" not in page
    assert (run / "report" / FIGURE).is_file()


def test_the_oracle_c_index_is_shown_beside_the_c_index(run):
    (run / ORACLE_FILE).write_text(json.dumps({"a": 0.81, "c": "junk"}))
    section = survival_html(run, read_metrics(run))
    assert "best achievable C" in section
    assert re.search(r"<tr><td>a</td>.*?<td>0\.810</td></tr>", section)
    lines = survival_lines(run, read_metrics(run))
    assert any("best achievable 0.81" in x for x in lines)


def test_the_plan_s_edges_and_horizons_are_used(tmp_path):
    run = tmp_path / "run"
    rec = RoundRecord(round=1, aggregated=True)
    table = {"low": ([10, 8], [1, 2]), "high": ([10, 6], [3, 3])}
    rec.evaluate["a"] = {"cases-outcome": 20.0, "num-val-cases": 20.0} | _table(table)
    append_metrics(run, round_entry(rec))
    plan = {"survival-edges-days": [100, 200, 300], "survival-horizons-days": [200]}
    (run / "plan.json").write_text(json.dumps(plan))
    assert plan_days(run) == ((100.0, 200.0, 300.0), (200.0,))
    lines = survival_lines(run, read_metrics(run))
    low, high = _km([10, 8], [1, 2]), _km([10, 6], [3, 3])
    assert f"event-free at 200 d: low {low:.2f}, high {high:.2f}" in lines[1]
    (run / "plan.json").write_text("{not json")
    assert plan_days(run)[0] == Plan().survival_edges_days


def test_a_segmentation_run_has_no_prognosis_section(tmp_path):
    run = tmp_path / "run"
    rec = RoundRecord(round=1, aggregated=True)
    rec.evaluate["a"] = {"dice-kidney": 0.8, "num-val-cases": 4.0}
    append_metrics(run, round_entry(rec))
    entries = read_metrics(run)
    assert survival_lines(run, entries) == [] and survival_html(run, entries) == ""
    assert survival_lines(run, []) == [] and survival_html(run, []) == ""


def test_a_curve_stops_at_unusable_counts():
    m = _table({"low": ([10, 8, 6], [1, 2, 1])})
    assert km_curve(m, "low", 6)[0] == pytest.approx(
        [0.9, 0.9 * 6 / 8, 0.9 * 6 / 8 * 5 / 6]
    )
    for bad in (-3, float("nan"), "7", 2.5, True, 1e300, None):
        broken = m | {wire.atrisk_key("low", 1): bad}
        assert km_curve(broken, "low", 6) == ([0.9], [10])
    more_events = m | {wire.km_events_key("low", 1): 9.0}  # 9 events among 8
    assert km_curve(more_events, "low", 6) == ([0.9], [10])
    assert km_curve(m, "high", 6) == ([], [])


BAD = [float("nan"), float("inf"), -5, "x", None, True, [1], {"a": 1}, 1e308, 10**400]


def test_malformed_entries_do_not_raise(tmp_path):
    keys = ["c-harrell", "c-uno", "ibs", "td-auc-365", "cal-pred-1095"]
    keys += ["cal-obs-1095", "cases-outcome", "cases-event", "td-auc-99999"]
    keys += [wire.atrisk_key(g, k) for g in ("low", "high") for k in range(8)]
    keys += [wire.km_events_key(g, k) for g in ("low", "high") for k in range(8)]
    entries: list = [
        {"round": i, "weighted": {k: v for k in keys}, "evaluate": {f"s{i}": {k: v}}}
        for i, v in enumerate(BAD)
        for k in keys[:3]
    ]
    entries += [
        {"round": 1, "evaluate": {"s": dict.fromkeys(keys, v)}, "weighted": []}
        for v in BAD
    ]
    entries += [None, 3, "x", {"round": "x", "evaluate": [], "weighted": "w"}]
    entries += [{"evaluate": {HOSTILE: {"c-harrell": "0.9", "metrics-withheld": 1}}}]
    junk = {wire.atrisk_key("low", 99): 5, wire.km_events_key("high", 0): 3}
    drawn = _table(B_TABLE) | junk | {wire.atrisk_key("high", 1): float("nan")}
    entries += [{"round": 9, "evaluate": {HOSTILE: drawn}, "weighted": drawn}]
    (tmp_path / "plan.json").write_text(json.dumps({"survival-edges-days": "x"}))
    (tmp_path / ORACLE_FILE).write_text(json.dumps([1, 2]))
    lines = survival_lines(tmp_path, entries)
    section = survival_html(tmp_path, entries)
    assert lines and section.startswith('<h2 id="prognosis">')
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", section)
    assert "<script" not in text and "nan" not in text.lower()
    assert not any("nan" in x.lower() or "inf" in x.lower() for x in lines)
