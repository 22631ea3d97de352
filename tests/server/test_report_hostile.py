"""A report no site can break (issue 32).

A site chooses its declared name, the names of its metric keys, its refusal
reasons and its counts. Generated hostile ones (terminal escape codes, control
characters, bidi overrides, ``$\\frac{}{}$``, HTML and script tags, lone
surrogates, 100 kB strings, thousands of keys, confusion counts of classes the
plan does not have) go through every path that shows them: ``metrics.jsonl``,
the terminal line and summary, ``status.json``, ``kidneyfl coordinator
status``, the simulation's terminal and log, and the report, which must render
within its time limit and never hold the end of a run.
"""

from __future__ import annotations

import html
import io
import json
import re
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import server.deliver as deliver_mod
from common import wire
from common.config import Plan
from server.reporting.console import LINE_LIMIT, RunConsole
from server.reporting.figures import (
    MAX_CLASSES,
    MAX_CONFUSION_SITES,
    MAX_SITES_DRAWN,
    confusion_matrices,
)
from server.reporting.html import write_report
from server.reporting.live_report import LiveReport, draw_bounded
from server.reporting.metrics_log import (
    append_metrics,
    read_metrics,
    round_entry,
    round_line,
    summary_table,
)
from server.reporting.plots import metric_curves
from server.reporting.round_record import RoundRecord
from server.reporting.site_status import format_rows, site_rows
from server.reporting.status import (
    MESSAGE_LIMIT,
    RunStatus,
    read_status,
    status_line,
)
from server.reporting.text import NAME_LIMIT, TEXT_LIMIT, safe_record, safe_text
from tests.fakes import write_run

BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
LONG = "A" * 100_000
NASTY = [
    "\x1b[31mred\x1b[0m",
    "\x1b[2J\x1b[H",  # clear the screen, cursor home
    "\x1b]0;pwned\x07",  # window title
    "\x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\",  # hyperlink
    "\x1bPq#0;2;0;0;0\x1b\\",  # DCS (sixel)
    "\x9b31m\x9d0;t\x9c",  # C1 CSI, OSC, ST
    "honest\roverwritten",
    "back\b\b\bspace",
    "bell\x07",
    "nul\x00byte",
    "\u202eevil\u202c",
    "\u2066isolate\u2069",
    "$\\frac{}{}$",
    "$\\nocommand{$",
    "$x^$",
    "<script>alert(1)</script>",
    "</table><script src=//evil></script>",
    '"><img src=x onerror=alert(1)>',
    "\ud800lone surrogate",
    "tab\tnew\nline\u2028sep",
    "_legend_hidden",
    "cm-9-9",
    "e\u0301" * 40,
    LONG,
]
nasty = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.characters(blacklist_categories=()), max_size=40),
    st.lists(st.sampled_from(NASTY[:-1]) | st.text(max_size=5), max_size=6).map(
        "".join
    ),
)
number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**30), 10**30),
)
FAST = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_clean(text: str) -> None:
    """One or more lines a terminal shows as they are: printable, no bidi
    override, no site string past its limit."""
    for line in text.splitlines():
        assert line.isprintable(), repr(line[:200])
        assert not BIDI & set(line)
        assert "A" * (TEXT_LIMIT + 1) not in line
    text.encode("utf-8")  # no lone surrogate


def hostile_record(
    rnd: int, names: list[str], keys: list[str], why: str, many: int = 1000
) -> RoundRecord:
    """Round ``rnd`` of sites ``names`` sending metric ``keys`` (the first
    ``many`` sites all of them, the others 20) and refusing with ``why``."""
    rec = RoundRecord(round=rnd, aggregated=rnd % 2 == 0)
    for i, site in enumerate(names):
        ev = {k: float(i) for k in (keys if i < many else keys[:20])}
        ev.update({"dice-kidney": 0.5, "num-val-cases": 3.0, "cm-0-0": 2.0})
        rec.evaluate[site] = ev
        rec.train[site] = {"epsilon": 1.0 + i, "dp-enabled": 1.0, "delta": 1e-3}
        rec.refused[f"{site}-r"] = why
        rec.rejected[site] = why
    return rec


# -- the one sanitiser ---------------------------------------------------------


@FAST
@given(value=nasty, limit=st.integers(4, 400))
def test_safe_text_is_one_printable_bounded_line(value, limit):
    out = safe_text(value, limit)
    assert len(out) <= limit and out.isprintable() and not BIDI & set(out)
    assert "\x1b" not in out and "\r" not in out and "\n" not in out
    out.encode("utf-8")
    assert safe_text(out, limit) == out  # idempotent


@settings(max_examples=100, deadline=None, derandomize=True)
@given(name=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"))
def test_honest_names_keys_and_reasons_pass_unchanged(name):
    assert safe_text(name, NAME_LIMIT) == name
    for key in (wire.dice_key("kidney"), wire.confusion_key("cyst", "stone")):
        assert safe_text(key, NAME_LIMIT) == key
    for reason in wire.REFUSAL_CODES.values():
        assert safe_text(f"{reason} [code]") == f"{reason} [code]"
    entry = round_entry(hostile_record(1, [name], [], "why"))
    assert name in entry["evaluate"] and safe_record(entry) == entry


def test_escape_sequences_go_whole():
    assert safe_text("\x1b[1;31mred\x1b[0m") == "red"
    assert safe_text("\x1b]0;title\x07after") == "after"
    assert safe_text("a\x1b]8;;http://x\x1b\\b") == "ab"
    assert safe_text("honest\roverwritten") == "honest overwritten"
    assert safe_text("ab\u202ecd\u2069") == "abcd"
    assert safe_text(LONG, 50) == "A" * 47 + "..."
    assert safe_text("$\\frac{}{}$") == "$\\frac{}{}$"  # not markup: kept


# -- terminal, summary, status, coordinator status -------------------------------


@FAST
@given(
    names=st.lists(nasty, min_size=1, max_size=5),
    keys=st.lists(nasty, max_size=5),
    why=nasty,
    values=st.lists(number, max_size=5),
)
def test_hostile_rounds_reach_the_terminal_clean(names, keys, why, values):
    rec = hostile_record(1, names, keys, why)
    for site, v in zip(names, values, strict=False):
        rec.evaluate[site]["dice-kidney"] = v  # inf, NaN, 10**30...
        rec.train[site]["epsilon"] = v
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        append_metrics(run, round_entry(rec))
        # and a line no coordinator cleaned (an older one, or an edited file)
        raw = {"round": 2, "evaluate": rec.evaluate, "refused": {why: why}}
        raw["epsilon"] = {names[0]: values[0] if values else None}
        with (run / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(raw) + "\n")
        entries = read_metrics(run)
        assert [e["round"] for e in entries] == [1, 2]
        for e in entries:
            assert_clean(round_line(e))
        assert_clean(round_line(raw))  # given uncleaned, it cleans it itself
        assert_clean(summary_table(entries))
        assert_clean(format_rows(site_rows(None, entries, {why: why})))
        status = RunStatus(run, rounds_total=3)
        status.update(state="running", message=why, nodes={why: why, "1": names[0]})
        json.loads((run / "status.json").read_text())  # valid JSON
        got = read_status(run)
        assert_clean(status_line(got))
        for node, name in got["nodes"].items():
            assert len(node) <= NAME_LIMIT and len(name) <= TEXT_LIMIT


def test_the_simulation_terminal_and_log_stay_clean(tmp_path):
    run = tmp_path / "run"
    names = ["\x1b]0;pwned\x07a", "\u202eb", "c\rd", LONG]
    out = io.StringIO()
    with RunConsole(run, run / "flwr.log", out, live=False) as console:
        append_metrics(run, round_entry(hostile_record(1, names, ["\x1b[2J"], LONG)))
        console.stream_line("ERROR : site \x1b[31mx\x1b[0m\x1b]0;t\x07 failed " + LONG)
        console.poll()
    stream, *rounds = out.getvalue().splitlines()
    assert stream.startswith("ERROR : site x failed AAA") and rounds
    assert stream.isprintable() and len(stream) <= LINE_LIMIT  # a log line, cut
    assert_clean("\n".join(rounds))  # the round line: every site string cut
    log = (run / "flwr.log").read_text()
    assert log.splitlines()[0] == stream and log.splitlines()[1:] == rounds


# -- confusion matrices --------------------------------------------------------


@FAST
@given(
    cells=st.dictionaries(
        st.tuples(
            st.sampled_from(["0", "1", "2", "7", "999999999999", "a", "b", "zz"]),
            st.sampled_from(["0", "1", "3", "a", "b", "x_y", "00"]),
        ).map(lambda t: f"cm-{t[0]}-{t[1]}"),
        number | st.text(max_size=3) | st.none(),
        max_size=20,
    )
)
def test_confusion_keys_outside_the_plan_are_ignored(cells):
    entry = {"round": 1, "evaluate": {"s": dict(cells), "t": {"cm-a-a": 1}}}
    for names in (["a", "b"], None):
        for mat in confusion_matrices(entry, names).values():
            n = 2 if names else mat.shape[0]
            assert mat.shape == (n, n) and n <= MAX_CLASSES


def test_confusion_matrix_is_the_plan_s_size():
    m = {"cm-a-a": 3, "cm-a-b": 1, "cm-5-0": 9, "cm-a-zz": 9, "cm-b-b": "x"}
    m |= {"cm-b-a": float("inf"), "cm-99999999999999999999-0": 1}
    cms = confusion_matrices({"round": 1, "evaluate": {"s": m}}, ["a", "b"])
    assert cms["s"].shape == (2, 2) and cms["s"][0].tolist() == [3, 1]
    assert np.isnan(cms["s"][1]).all()  # row b: nothing usable sent


# -- the report ----------------------------------------------------------------


def test_mathtext_in_a_site_name_is_drawn_as_typed():
    entries = [{"round": 1, "evaluate": {"$\\nocommand{$": {"$x^$": 0.5}}}]
    assert metric_curves(entries, ["$x^$"], "$\\frac{}{}$")[:4] == b"\x89PNG"


def _hostile_run(tmp: Path) -> Path:
    run = tmp / "run"
    names = [f"{NASTY[i % len(NASTY)]}{i}" for i in range(30)]  # > MAX_SITES_DRAWN
    junk = [f"{NASTY[i % 8]}k{i}" for i in range(2000)]  # thousands of keys
    junk += [f"cm-{i}-{j}" for i in range(40) for j in range(40)]  # not in the plan
    for r in (1, 2):
        append_metrics(run, round_entry(hostile_record(r, names, junk, LONG, 3)))
    with (run / "metrics.jsonl").open("a") as fh:  # uncleaned, as written by hand
        raw = hostile_record(3, names, junk[:500], NASTY[-3], 3)
        fh.write(json.dumps({"round": 3, "evaluate": raw.evaluate}) + "\n")
    plan = Plan().model_dump(by_alias=True, mode="json")
    (run / "plan.json").write_text(json.dumps(plan))
    RunStatus(run, 3, 3).update(state="finished", message="B" * 100_000 + "\x1b[2J")
    return run


def test_a_hostile_run_renders_in_time_and_escapes_every_site_string(tmp_path):
    run = _hostile_run(tmp_path)
    t0 = time.monotonic()
    page = write_report(run).read_text(encoding="utf-8")
    took = time.monotonic() - t0
    assert took < 20, f"the report took {took:.1f} s"
    assert page.count("<script") == 1  # the page's own check, nothing a site sent
    assert "<img src=x" not in page and "</table><script" not in page
    assert html.escape("<script>alert(1)</script>") in page  # shown, as text
    assert not BIDI & set(page) and "\x1b" not in page and "\r" not in page
    assert "A" * (TEXT_LIMIT + 1) not in page  # site strings
    assert "B" * (MESSAGE_LIMIT + 1) not in page  # the status message
    assert f"Drawn: the first {MAX_SITES_DRAWN} sites" in page
    ids = re.findall(r'<h2 id="([a-z-]+)"', page)
    assert {"final", "curves", "loss", "privacy", "confusion"} <= set(ids)
    files = list((run / "report").glob("confusion-*.png"))
    assert len(files) == MAX_CONFUSION_SITES + 1  # and all sites
    json.loads((run / "status.json").read_text())


@settings(max_examples=3, deadline=None, derandomize=True)
@given(
    names=st.lists(nasty, min_size=1, max_size=3),
    keys=st.lists(nasty, max_size=3),
    why=nasty,
    classes=st.lists(st.sampled_from(["0", "1", "5", "cyst", "zz", "a_b"]), max_size=4),
)
def test_generated_hostile_rounds_render(names, keys, why, classes):
    keys = keys + [f"cm-{t}-{p}" for t in classes for p in classes]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        append_metrics(run, round_entry(hostile_record(1, names, keys, why)))
        plan = Plan().model_dump(by_alias=True, mode="json")
        (run / "plan.json").write_text(json.dumps(plan))
        RunStatus(run, 2, 1).update(state="running", message=why)
        t0 = time.monotonic()
        page = write_report(run).read_text(encoding="utf-8")
        assert time.monotonic() - t0 < 20
        assert page.count("<script") == 1 and not BIDI & set(page)
        assert "\x1b" not in page and "A" * (TEXT_LIMIT + 1) not in page
        json.loads((run / "status.json").read_text())


def test_a_slow_report_never_holds_the_end_of_a_run(tmp_path, monkeypatch, caplog):
    run = _hostile_run(tmp_path)
    release = threading.Event()
    monkeypatch.setattr(deliver_mod, "report", lambda _run: release.wait(30))
    t0 = time.monotonic()
    deliver_mod.deliver(run, time_limit_s=0.5)  # the final model: none; logged
    assert time.monotonic() - t0 < 5
    note = read_status(run)["report"]
    assert "not drawn" in note and f"kidneyfl report {run.resolve()}" in note
    assert "not drawn" in caplog.text and "not drawn" in status_line(read_status(run))
    # the run's own status writes keep the note; a second drawing does not pile up
    RunStatus(run, 3, 3).update(state="finished")
    assert "not drawn" in read_status(run)["report"]
    assert not draw_bounded(run, lambda: None, 0.5)
    assert "still going" in read_status(run)["report"]
    release.set()  # the slow drawing ends after all: the note goes
    deadline = time.monotonic() + 10
    while "report" in read_status(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "report" not in read_status(run)


def test_a_failing_drawing_is_noted_and_the_live_report_waits_boundedly(tmp_path):
    run = write_run(tmp_path, rounds=1)
    RunStatus(run, 3, 1).update(state="running")

    def boom() -> None:
        raise RuntimeError("broken figure")

    assert not draw_bounded(run, boom, 5)
    assert "drawing failed" in read_status(run)["report"]
    reports = LiveReport(run, time_limit_s=0.2)
    release = threading.Event()
    reports._thread = threading.Thread(target=release.wait, args=(30,), daemon=True)
    reports._thread.start()  # a live pass that hangs
    t0 = time.monotonic()
    assert reports.wait() is False and time.monotonic() - t0 < 3
    release.set()
    assert draw_bounded(run, lambda: None, 60)  # drawn: the note goes
    assert "report" not in read_status(run)


@pytest.mark.parametrize("name", ["$\\frac{}{}$", "<b>x</b>", "\u202eabc"])
def test_a_site_name_in_a_figure_title_is_plain_text(tmp_path, name):
    rec = RoundRecord(round=1)
    rec.evaluate = {name: {"cm-0-0": 1, "cm-0-1": 2, "cm-1-1": 3, "num-val-cases": 6}}
    run = tmp_path / "run"
    append_metrics(run, round_entry(rec))
    plan = Plan().model_dump(by_alias=True, mode="json")
    (run / "plan.json").write_text(json.dumps(plan))
    page = write_report(run).read_text(encoding="utf-8")
    assert 'id="confusion"' in page and "<b>x</b>" not in page
