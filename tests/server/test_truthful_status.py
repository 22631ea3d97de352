"""What the terminal, the report and ``status`` show is true (issue 33): a
site silent in a round keeps the epsilon it last reported, the report names
the accountant the ledgers use, and the round running is not confused with
the rounds completed."""

from __future__ import annotations

from server.reporting.metrics_log import (
    append_metrics,
    last_known_privacy,
    round_entry,
    round_line,
    round_lines,
    summary_table,
)
from server.reporting.round_record import RoundRecord
from server.reporting.status import RunStatus, read_status, status_line


def _round(rnd: int, failed: bool = False, dp_b: bool = True) -> dict:
    """Round ``rnd`` of hospitals a and b; b fails training when ``failed``
    (it still evaluates: it was restarted before the evaluation)."""
    rec = RoundRecord(round=rnd, aggregated=True)
    for site, eps in (("hospital-a", 2.0 * rnd), ("hospital-b", 2.8 * rnd)):
        rec.evaluate[site] = {"dice-kidney": 0.1 * rnd, "num-val-cases": 2.0}
        dp = dp_b or site == "hospital-a"
        rec.train[site] = {
            "epsilon": eps if dp else float("inf"),
            "dp-enabled": float(dp),
            "delta": 1e-3,
        }
    if failed:
        del rec.train["hospital-b"]
        rec.failed["hospital-b"] = "no reply within round-timeout"
    return round_entry(rec)


def test_a_dp_site_that_failed_shows_its_last_epsilon_and_no_reply():
    entries = [_round(1), _round(2), _round(3, failed=True)]
    line = round_lines(entries)[-1]
    assert "hospital-a: kidney 0.300 eps=6.00" in line  # answered: unchanged
    assert "hospital-b: kidney 0.300 eps=5.60 (no reply; as of round 2)" in line
    assert "eps=off" not in line and "hospital-b FAILED (no reply" in line
    table = summary_table(entries)
    row = next(r for r in table.splitlines() if r.startswith("hospital-b"))
    assert "5.600" in row and "1e-03" in row and "no reply; as of round 2" in row
    assert "5.600    1e-03" in row and " off " not in row  # not "off" and "-"
    a_row = next(r for r in table.splitlines() if r.startswith("hospital-a"))
    assert "6.000" in a_row and "no reply" not in a_row


def test_nothing_known_is_a_question_mark_and_dp_off_stays_off():
    line = round_line(_round(1, failed=True))  # no earlier round: unknown
    assert "hospital-b: kidney 0.100 eps=? (no reply)" in line
    entries = [_round(1, dp_b=False), _round(2, failed=True, dp_b=False)]
    assert "hospital-b: kidney 0.200 eps=off (no reply" in round_lines(entries)[-1]
    assert last_known_privacy(entries)["hospital-b"].dp is False


def test_a_site_that_answered_before_and_is_gone_stays_in_the_summary():
    gone = RoundRecord(round=2, aggregated=True)
    gone.evaluate["hospital-a"] = {"dice-kidney": 0.2, "num-val-cases": 2.0}
    gone.train["hospital-a"] = {"epsilon": 4.0, "dp-enabled": 1.0, "delta": 1e-3}
    gone.refused["hospital-b"] = "site hospital-b: epsilon would pass its ceiling"
    entries = [_round(1), round_entry(gone)]
    line = round_lines(entries)[-1]
    assert "hospital-b REFUSED (site hospital-b" in line
    assert "eps=2.80 (refused; as of round 1)" in line
    assert "refused; as of round 1" in summary_table(entries)


def test_the_report_names_the_prv_accountant_and_last_known_epsilon(tmp_path):
    from server.reporting.html import write_report

    run = tmp_path / "run"
    for e in (_round(1), _round(2, failed=True)):
        append_metrics(run, e)
    page = write_report(run).read_text()
    assert "PRV accountant (Opacus), computed by each site" in page
    assert "RDP" not in page
    assert "2.800 (no reply; as of round 1)" in page


def test_status_names_the_round_in_progress_and_the_rounds_completed(tmp_path):
    status = RunStatus(tmp_path, rounds_total=2, rounds_done=1)
    status.update(state="running")
    assert "running: round 1 of 2, updated" in status_line(read_status(tmp_path))
    assert "round 2 not started yet" in status_line(read_status(tmp_path))
    status.asked("train", 2)
    line = status_line(read_status(tmp_path))
    assert "running: round 2 of 2 in progress (training), 1 completed" in line
    status.round_done(2)
    status.update(state="finished")
    line = status_line(read_status(tmp_path))
    assert line.startswith("finished: round 2 of 2, updated")
    assert "not started" not in line and "in progress" not in line


def test_coordinator_status_says_round_2_of_2_in_progress_1_completed(tmp_path):
    from server.reporting.site_status import coordinator_status

    append_metrics(tmp_path, _round(1))
    status = RunStatus(tmp_path, rounds_total=2, rounds_done=1)
    status.update(state="running")
    status.asked("train", 2)
    text, rows = coordinator_status(tmp_path, None)
    assert "round 2 of 2 in progress (training), 1 completed" in text
    assert "round 1 of 2," not in text
    assert {r["site"]: r["epsilon"] for r in rows} == {
        "hospital-a": 2.0,
        "hospital-b": 2.8,
    }
