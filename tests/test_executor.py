"""The site executor's warm spare, with a stand-in task process (no Flower run)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import client.executor as ex

# Stands in for `python -m client.executor task SITE`: records its argv and,
# as a spare, the task it was handed on stdin, then stays alive until a
# "release" file exists so the test controls when the task ends.
FAKE_TASK = """
import json, pathlib, sys, time
out = pathlib.Path(sys.argv[1])
kind = "spare" if "--spare" in sys.argv else "fresh"
name = f"{len(list(out.glob('*.json')))}-{kind}"
record = {"argv": sys.argv[2:]}
if "--spare" in sys.argv:
    line = sys.stdin.readline()
    if not line.strip():
        (out / (name + ".eof")).write_text("")
        sys.exit(0)
    record["task"] = json.loads(line)
(out / (name + ".json")).write_text(json.dumps(record))
while not (out / "release").exists():
    time.sleep(0.05)
"""


def _wait(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _spec(token: str):
    from flwr.supercore.constant import TaskType

    return SimpleNamespace(
        task_type=TaskType.CLIENT_APP,
        runtime_api_address="127.0.0.1:9094",
        token=token,
        insecure=True,
        root_certificates_path=None,
        parent_pid=None,
    )


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_task.py"
    script.write_text(FAKE_TASK)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(
        ex, "task_command", lambda site: [sys.executable, str(script), str(out)]
    )
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def test_task_goes_to_the_warm_spare_and_a_new_spare_is_ready_at_once(fake):
    execu = ex.GateExecutor("site.yaml", warm=True)
    try:
        execu.reconcile()  # idle: a spare starts and waits on its pipe
        spare = execu._spare
        assert spare is not None and spare.poll() is None
        execu.launch(_spec("secret-token"))
        _wait(lambda: len(_records(fake)) == 1)
        rec = _records(fake)[0]
        assert "--spare" in rec["argv"]
        assert rec["task"]["token"] == "secret-token"  # through the pipe ...
        assert not any("secret-token" in a for a in rec["argv"])  # ... not argv
        assert execu.handed_to_spare == 1
        # The next spare starts beside the running task, ready for the next
        # message; the task itself is reaped once it ends.
        execu.reconcile()
        assert execu._spare is not None and execu._spare is not spare
        assert execu._tasks == [spare]
        (fake / "release").write_text("")
        _wait(lambda: spare.poll() is not None)
        execu.reconcile()
        assert execu._tasks == []
    finally:
        (fake / "release").write_text("")
        execu.close()
    # Closing the executor ends the idle spare through EOF on its pipe.
    _wait(lambda: any(fake.glob("*.eof")))


def test_without_warm_start_each_task_is_a_fresh_process(fake):
    execu = ex.GateExecutor("site.yaml", warm=False)
    (fake / "release").write_text("")
    execu.reconcile()
    assert execu._spare is None
    execu.launch(_spec("tok"))
    _wait(lambda: len(_records(fake)) == 1)
    argv = _records(fake)[0]["argv"]
    assert "--spare" not in argv
    assert argv[argv.index("--token") + 1] == "tok"
    assert execu.handed_to_spare == 0


def test_a_dead_spare_is_replaced_and_the_task_still_runs(fake):
    execu = ex.GateExecutor("site.yaml", warm=True)
    (fake / "release").write_text("")
    try:
        execu.reconcile()
        execu._spare.kill()
        execu._spare.wait()
        execu.launch(_spec("tok"))  # falls back to a fresh process
        _wait(lambda: len(_records(fake)) == 1)
        assert "--spare" not in _records(fake)[0]["argv"]
        assert execu.handed_to_spare == 0
    finally:
        execu.close()


def test_spare_waits_for_its_task_and_exits_on_eof(monkeypatch):
    import io

    monkeypatch.setattr(ex, "WARM_MODULES", ("json", "not_a_module_xyz"))
    task = {"runtime_api_address": "a:1", "token": "t", "insecure": True}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(task) + "\n"))
    got = ex.await_task()
    assert got.token == "t" and got.runtime_api_address == "a:1"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert ex.await_task() is None
