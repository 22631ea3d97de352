"""A newcomer's first commands: examples in every --help, defaults that work,
errors that name the file, the key and the fix; ``coordinator status``."""

from __future__ import annotations

import argparse
import json
import stat
import sys
from pathlib import Path

import pytest

from cli.main import build_parser
from cli.main import main as kidneyfl
from server.reporting.metrics_log import append_metrics, round_entry
from server.reporting.round_record import RoundRecord
from server.reporting.site_status import coordinator_status, format_rows, site_rows
from server.reporting.status import RunStatus
from tests.fakes import write_site_yaml


def _subcommands(parser: argparse.ArgumentParser, path: tuple = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subcommands(sub, (*path, name))


def test_every_subcommand_help_has_an_example():
    subs = list(_subcommands(build_parser()))
    assert len(subs) > 15
    missing = [" ".join(p) for p, sub in subs if "example" not in sub.format_help()]
    assert not missing, f"--help without an example: {missing}"


def test_phantom_works_without_a_site_profile(tmp_path, capsys):
    out = tmp_path / "x"
    argv = ["phantom", "--out", str(out), "--cases", "1", "--scale", "8"]
    assert kidneyfl(argv) == 0
    assert (out / "case_00000" / "imaging.nii.gz").is_file()
    assert "profile standard-nephro" in capsys.readouterr().out


def test_prognosis_phantoms_come_with_outcomes_a_site_reads(tmp_path):
    from client.data.outcomes import read_outcomes
    from common.config import load_site_config

    out = tmp_path / "data" / "p"
    argv = ["phantom", "--task", "prognosis", "--out", str(out), "--cases", "4"]
    assert kidneyfl([*argv, "--scale", "8"]) == 0
    site_yaml = write_site_yaml(tmp_path, "p", generate=False)
    outcomes = read_outcomes(load_site_config(site_yaml))
    assert sorted(outcomes) == [f"case_{i:05d}" for i in range(4)]
    assert all(o.time > 0 and o.event in (0, 1) for o in outcomes.values())


def test_plan_file_and_set_both_reach_the_plan(tmp_path, capsys):
    """``simulate --plan`` reads a plan TOML; --set overrides it; a bad key in
    the file is named like a bad --set."""
    site = write_site_yaml(tmp_path, "a", generate=False)
    plan = tmp_path / "plan.toml"
    plan.write_text('task = "prognosis"\nlearning-rat = 0.1\n')
    argv = ["simulate", "--sites", str(site), "--plan", str(plan)]
    assert kidneyfl([*argv, "--out-dir", str(tmp_path / "runs")]) == 2
    assert "learning-rat" in capsys.readouterr().err
    plan.write_text("task = [\n")
    assert kidneyfl([*argv, "--out-dir", str(tmp_path / "runs")]) == 2
    assert str(plan) in capsys.readouterr().err


def test_wrong_plan_key_names_the_key_and_the_fix(tmp_path, capsys):
    site = write_site_yaml(tmp_path, "a", generate=False)
    argv = ["simulate", "--sites", str(site), "--set", "learning-rat=0.1"]
    assert kidneyfl([*argv, "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "learning-rat" in err and "simulation plan" in err


def test_wrong_site_key_names_the_file_the_key_and_the_fix(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: a\ndata: {root: .}\nstate_dir: s\ndevcie: cpu\n")
    assert kidneyfl(["simulate", "--sites", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "devcie: unknown key; remove it" in err


# -- coordinator status ----------------------------------------------------------
def _round(rnd: int, refuse_c: bool) -> dict:
    rec = RoundRecord(round=rnd, aggregated=True)
    for site in ("hospital-a", "hospital-b"):
        rec.train[site] = {"epsilon": 1.5 * rnd, "dp-enabled": 1.0, "delta": 1e-3}
        rec.evaluate[site] = {"dice-kidney": 0.5}
    if refuse_c:
        rec.refused["hospital-c"] = "site hospital-c: budget 5 would be passed"
    return round_entry(rec)


LISTING = {
    "success": True,
    "nodes": [
        {"node-id": "11", "owner-name": "<none>", "status": "online"},
        {"node-id": "22", "owner-name": "<none>", "status": "offline"},
        {"node-id": "33", "owner-name": "<none>", "status": "registered"},
    ],
}
NAMES = {"11": "hospital-a", "22": "hospital-b", "33": "hospital-c"}


def test_site_rows_join_the_listing_and_the_run_files():
    entries = [_round(1, refuse_c=True), _round(2, refuse_c=False)]
    rows = {r["site"]: r for r in site_rows(LISTING["nodes"], entries, NAMES)}
    assert rows["hospital-a"]["superlink"] == "online"
    assert rows["hospital-b"]["superlink"] == "offline"
    assert (rows["hospital-a"]["last_round"], rows["hospital-a"]["epsilon"]) == (2, 3.0)
    c = rows["hospital-c"]
    assert c["last_round"] is None and c["superlink"] == "registered"
    assert c["last_refusal"].startswith("round 1 refused: site hospital-c: budget")
    table = format_rows(list(rows.values())).splitlines()
    assert table[0].split()[:3] == ["site", "node", "SuperLink"]
    assert table[1].split()[:5] == ["hospital-a", "11", "online", "2", "3.00"]
    # without the SuperLink: the run's files alone, online unknown
    rows = site_rows(None, entries, {})
    assert {r["superlink"] for r in rows} == {"?"}


def _fake_flwr(tmp: Path, listing: dict | None) -> str:
    """An executable standing in for `flwr`: prints the listing, or fails."""
    script = tmp / "flwr"
    body = (
        f"print({json.dumps(json.dumps(listing))})"
        if listing
        else "import sys; print('connection refused', file=sys.stderr); sys.exit(1)"
    )
    script.write_text(f"#!{sys.executable}\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_coordinator_status_from_a_fake_superlink_and_the_run(tmp_path):
    run = tmp_path / "run"
    append_metrics(run, _round(1, refuse_c=True))
    RunStatus(run, rounds_total=5, rounds_done=1).update(state="running", nodes=NAMES)
    text, rows = coordinator_status(
        run, "consortium", flwr_bin=_fake_flwr(tmp_path, LISTING)
    )
    assert "SuperLink consortium: 3 node(s), 1 online" in text
    assert "run run: running: round 1 of 5" in text
    assert [r["site"] for r in rows] == ["hospital-a", "hospital-b", "hospital-c"]
    text, _ = coordinator_status(run, "consortium", flwr_bin=_fake_flwr(tmp_path, None))
    assert "not reachable" in text and "connection refused" in text
    assert "hospital-c" in text  # the run's files still answer


def test_coordinator_status_command_needs_a_run_or_a_connection(tmp_path, capsys):
    assert kidneyfl(["coordinator", "status"]) == 2
    assert "--connection" in capsys.readouterr().err
    run = tmp_path / "run"
    append_metrics(run, _round(1, refuse_c=False))
    assert kidneyfl(["coordinator", "status", str(run)]) == 0
    assert "hospital-a" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["status"], ["report"]])
def test_run_commands_name_a_missing_run_folder(tmp_path, capsys, args):
    assert kidneyfl([*args, str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
