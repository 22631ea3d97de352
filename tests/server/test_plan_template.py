"""`kidneyfl coordinator plan`: a deployment plan to edit, valid as written."""

from __future__ import annotations

import tomllib

import pytest

from cli.main import main
from common.config import load_plan
from server.plan_template import render
from sim.runner import PROJECT_DIR


def test_the_repository_example_is_the_template():
    assert (PROJECT_DIR / "sites" / "plan.toml").read_text() == render()


def test_plan_command_writes_a_valid_plan_and_never_overwrites(tmp_path, capsys):
    path = tmp_path / "kits.toml"
    args = ["coordinator", "plan", str(path), "--run-name", "kits-2027"]
    args += ["--out-dir", "/srv/runs", "--expected-sites", "4", "--rounds", "10"]
    assert main(args) == 0
    assert "flwr run . consortium -c" in capsys.readouterr().out
    plan = load_plan(tomllib.loads(path.read_text()))
    assert plan.run_name == "kits-2027" and plan.num_server_rounds == 10
    assert plan.expected_sites == 4 and str(plan.out_dir) == "/srv/runs"
    before = path.read_text()
    assert main(args) != 0  # exists: refused, left as it was
    assert path.read_text() == before


@pytest.mark.parametrize(
    "values, why",
    [
        ({"out_dir": "runs"}, "absolute"),
        ({"run_name": "../x"}, "run name"),
        ({"min_sites": 5, "expected": 3}, "min-sites"),
        ({"epsilon": -1.0}, "epsilon"),
    ],
)
def test_a_bad_value_is_refused_before_anything_is_written(values, why):
    with pytest.raises(Exception, match=why):
        render(**values)
