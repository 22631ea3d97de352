"""What the simulation's terminal shows, the run's status file and ``kidneyfl
status``: Flower's doubled lines and dependency warnings never reach the
terminal, every line reaches the run's log, round lines come from the
coordinator's files."""

from __future__ import annotations

import io
import json
import time
import warnings
from pathlib import Path

import pytest

from common.logs import quiet_dependency_warnings
from server.reporting.console import RunConsole, banner, normalise
from server.reporting.metrics_log import append_metrics, round_entry
from server.reporting.round_record import RoundRecord
from server.reporting.status import ProgressGrid, RunStatus, progress_text, read_status

# Real lines of `flwr run --stream` (Flower 1.41): each Flower record twice.
STREAM = [
    "\x1b[92mINFO \x1b[0m:      [ROUND 1/2]",
    "11/30/2026 14:00:56:INFO:[ROUND 1/2]",
    "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 2 nodes (out of 2)",
    "11/30/2026 14:00:56:INFO:configure_train: Sampled 2 nodes (out of 2)",
    "\x1b[36m(ClientAppActor pid=6382)\x1b[0m /x/monai/utils/deprecate_utils.py:320: "
    "FutureWarning: monai.transforms.spatial.dictionary Orientationd.__init__",
    "\x1b[36m(ClientAppActor pid=6382)\x1b[0m   warn_deprecated(argname, msg)",
    "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception",
    "11/30/2026 14:00:57:ERROR:ServerApp thread raised an exception",
]


def _entry(rnd: int) -> dict:
    rec = RoundRecord(round=rnd, aggregated=True)
    rec.evaluate["hospital-a"] = {"dice-kidney": 0.1 * rnd, "num-val-cases": 2.0}
    rec.train["hospital-a"] = {"epsilon": rnd, "dp-enabled": 1.0, "delta": 1e-3}
    return round_entry(rec)


def test_both_flower_formats_normalise_to_one_line():
    assert normalise(STREAM[0]) == normalise(STREAM[1]) == ("INFO", "[ROUND 1/2]")
    assert normalise("(ClientAppActor pid=1) WARNING kidneyfl.client: x")[0] == (
        "WARNING"
    )


def test_quiet_terminal_shows_rounds_and_errors_once_and_logs_everything(tmp_path):
    run, out = tmp_path / "run", io.StringIO()
    run.mkdir()
    with RunConsole(run, run / "logs" / "flwr.log", out, poll_s=0.05) as console:
        console.say("kidneyfl run x")
        for line in STREAM:
            console.stream_line(line)
        append_metrics(run, _entry(1))
        time.sleep(0.3)  # the watcher picks the round up from metrics.jsonl
        append_metrics(run, _entry(2))
    shown = out.getvalue().splitlines()
    assert shown[0] == "kidneyfl run x"
    assert [s[:9] for s in shown[1:]] == ["ERROR :  ", "round   1", "round   2"]
    assert len(shown) == len(set(shown))
    assert "Warning" not in out.getvalue() and "\x1b" not in out.getvalue()
    logged = (run / "logs" / "flwr.log").read_text()
    assert logged.count("[ROUND 1/2]") == 2 and "FutureWarning" in logged
    assert "\x1b" not in logged


def test_verbose_shows_the_stream_without_repeats(tmp_path):
    out = io.StringIO()
    with RunConsole(tmp_path, tmp_path / "l.log", out, verbose=True) as console:
        for line in STREAM:
            console.stream_line(line)
    shown = out.getvalue().splitlines()
    assert sum("[ROUND 1/2]" in s for s in shown) == 1
    assert sum("raised an exception" in s for s in shown) == 1


def test_dependency_warnings_are_filtered_by_module_not_globally():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependency_warnings()
        # what MONAI's deprecate_utils does, from its own module
        exec(  # noqa: S102 - a stand-in module name, nothing else
            "import warnings\nwarnings.warn('monai.x: default changed', FutureWarning)",
            {"__name__": "monai.utils.deprecate_utils"},
        )
        warnings.warn("monai.x: default changed", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["monai.x: default changed"]
    assert caught[0].filename == __file__  # ours still shows


class _Msg:
    def __init__(self, kind: str) -> None:
        self.metadata = type("M", (), {"message_type": kind})()


class _Grid:
    def __init__(self) -> None:
        self.replies: list[list[str]] = [[], ["r1"], [], ["r2", "r3"]]

    def push_messages(self, messages):
        return [f"id{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        return self.replies.pop(0)

    def get_node_ids(self):
        return [1, 2, 3]


def test_progress_grid_counts_requests_and_answers(tmp_path):
    status = RunStatus(tmp_path, rounds_total=5, rounds_done=2)
    grid = ProgressGrid(_Grid(), status)
    assert grid.get_node_ids() == [1, 2, 3]  # everything else passes through
    grid.push_messages([_Msg("train")] * 3)
    grid.pull_messages(["id0"])
    grid.pull_messages(["id0"])
    st = read_status(tmp_path)
    assert (st["phase"], st["sites_asked"], st["sites_answered"]) == ("training", 3, 1)
    text = progress_text(st, now=st["round_started"] + 65)
    assert text == (
        "round 3 of 5: training, 1 of 3 sites answered, 2 working, 1:05 elapsed"
    )
    status.round_done(3)
    st = read_status(tmp_path)
    assert st["rounds_done"] == 3 and progress_text(st) == ""


def test_status_command_prints_state_rounds_and_progress(tmp_path, capsys):
    from cli.main import main as kidneyfl

    run = tmp_path / "run"
    append_metrics(run, _entry(1))
    status = RunStatus(run, rounds_total=4, rounds_done=1)
    status.update(state="running")
    status.asked("evaluate", 2)
    assert kidneyfl(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "run run: running: round 2 of 4 in progress (evaluating), 1 completed" in out
    assert "round   1 |" in out and "round 2 of 4: evaluating, 0 of 2" in out
    assert "Summary" not in out  # the run is not over
    status.update(state="finished", rounds_done=4, phase="")
    assert kidneyfl(["status", str(run)]) == 0
    assert "Summary after round 1" in capsys.readouterr().out
    assert kidneyfl(["status", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_banner_names_run_plan_sites_privacy_and_where_results_go(tmp_path):
    from common.config import Plan, load_site_config
    from tests.fakes import write_site_yaml

    site = load_site_config(write_site_yaml(tmp_path, "hospital-a", generate=False))
    plan = Plan.model_validate({"num-server-rounds": 3, "dp-target-epsilon": 4})
    text = banner(tmp_path / "runs" / "r1", plan, [site], tmp_path / "runs/r1/logs")
    assert "kidneyfl run r1" in text and "3 rounds" in text
    assert "hospital-a delta 0.001, ceiling 100" in text
    assert "target epsilon 4 per site" in text and "runs/r1/logs" in text
    assert json.dumps(text)  # plain text, one string


@pytest.mark.parametrize("state", ["finished", "stopped"])
def test_report_stops_reloading_when_the_run_ends(tmp_path, state):
    from server.reporting.html import write_report

    run = tmp_path / "run"
    append_metrics(run, _entry(1))
    status = RunStatus(run, rounds_total=3, rounds_done=1)
    status.update(state="running")
    assert 'http-equiv="refresh"' in write_report(run).read_text()
    status.update(state=state, message="why" if state == "stopped" else "")
    page = write_report(run).read_text()
    assert 'http-equiv="refresh"' not in page and f"{state}: round 1 of 3" in page


def test_report_before_the_first_round_says_it_is_waiting(tmp_path):
    from server.reporting.html import write_report

    RunStatus(Path(tmp_path), rounds_total=3).update(state="waiting-for-sites")
    page = write_report(tmp_path).read_text()
    assert "waiting-for-sites: round 0 of 3" in page and "refresh" in page


def test_live_report_rewrites_beside_the_round_loop(tmp_path):
    from server.reporting.live_report import LiveReport

    run = tmp_path / "run"
    append_metrics(run, _entry(1))
    status = RunStatus(run, rounds_total=3, rounds_done=1)
    status.update(state="running")
    reports = LiveReport(run)
    reports.request()
    append_metrics(run, _entry(2))
    status.round_done(2)
    reports.request()  # while the first pass may still run: one more pass after
    reports.wait()
    page = (run / "report.html").read_text()
    assert "running: round 2 of 3" in page and "2 round(s)" in page
