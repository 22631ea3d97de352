"""``kidneyfl simulate --run-name``: a name is one folder under ``--out-dir``,
never a path. A bad one is refused before anything is written (no phantom
cases, no run folder, no canaries) and the error names the flag and the fix.
Fast: no Flower is started."""

from __future__ import annotations

import pytest

from cli.main import main as kidneyfl
from tests.fakes import write_site_yaml


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "name", ["..", "../escape", "a/b", "/tmp/abs", "x\x00y", "x" * 101, ".hidden"]
)
def test_a_run_name_that_is_a_path_writes_nothing(tmp_path, capsys, name):
    site = write_site_yaml(tmp_path, "a", generate=False)  # phantom not yet written
    before = _files(tmp_path)
    argv = ["simulate", "--sites", str(site), "--run-name", name, "--rounds", "1"]
    argv += ["--out-dir", str(tmp_path / "runs"), "--audit-canaries", "2"]
    assert kidneyfl(argv) == 2
    err = capsys.readouterr().err
    assert "--run-name" in err and "letters, digits" in err
    assert "\x00" not in err
    assert _files(tmp_path) == before  # no runs/, no phantom cases, no canaries


def test_an_operator_out_dir_may_climb_but_the_run_stays_in_it(tmp_path, capsys):
    site = write_site_yaml(tmp_path, "a", generate=False)
    link = tmp_path / "runs" / "r1"
    link.parent.mkdir()
    link.symlink_to(tmp_path)  # an existing run folder that leads elsewhere
    argv = ["simulate", "--sites", str(site), "--run-name", "r1"]
    out = tmp_path / "sub" / ".." / "runs"  # the operator's own '..': resolved
    assert kidneyfl([*argv, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--run-name" in err and "outside --out-dir" in err
