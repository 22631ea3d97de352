"""The site executor's warm start (fork server, spare), with stand-in tasks."""

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
if "--forkserver" in sys.argv:  # one record per task line, until EOF
    while line := sys.stdin.readline():
        n = len(list(out.glob('*.json')))
        rec = {"argv": sys.argv[2:], "task": json.loads(line)}
        (out / f"{n}-fork.json").write_text(json.dumps(rec))
    (out / "fork.eof").write_text("")
    sys.exit(0)
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


def test_tasks_go_to_one_fork_server_through_its_pipe(fake):
    execu = ex.GateExecutor("site.yaml", warm=True, fork=True)
    try:
        execu.reconcile()  # idle: the fork server starts and waits on its pipe
        server = execu._spare
        assert server is not None and server.poll() is None
        execu.launch(_spec("token-1"))
        execu.reconcile()
        execu.launch(_spec("token-2"))
        _wait(lambda: len(_records(fake)) == 2)
        recs = _records(fake)
        assert [r["task"]["token"] for r in recs] == ["token-1", "token-2"]
        assert all("--forkserver" in r["argv"] for r in recs)
        assert not any("token" in a for r in recs for a in r["argv"])  # not argv
        # One server for both tasks; nothing for the executor to reap.
        assert execu._spare is server and execu._tasks == []
        assert execu.handed_to_spare == 2
    finally:
        execu.close()
    _wait(lambda: (fake / "fork.eof").exists())  # EOF on its pipe ends it
    assert server.poll() == 0


@pytest.mark.parametrize(("fork", "flag"), [(True, "--forkserver"), (False, "--spare")])
def test_a_dead_warm_process_means_a_cold_task_then_a_new_one(fake, fork, flag):
    execu = ex.GateExecutor("site.yaml", warm=True, fork=fork)
    (fake / "release").write_text("")
    try:
        execu.reconcile()
        execu._spare.kill()
        execu._spare.wait()
        execu.launch(_spec("tok"))  # falls back to a fresh process
        _wait(lambda: len(_records(fake)) == 1)
        assert flag not in _records(fake)[0]["argv"]
        assert execu.handed_to_spare == 0
        execu.reconcile()  # and the next message finds a new warm process
        assert execu._spare is not None and execu._spare.poll() is None
        execu.launch(_spec("tok2"))
        assert execu.handed_to_spare == 1
    finally:
        execu.close()


def test_task_goes_to_the_warm_spare_and_a_new_spare_is_ready_at_once(fake):
    execu = ex.GateExecutor("site.yaml", warm=True, fork=False)
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


def test_spare_waits_for_its_task_and_exits_on_eof(monkeypatch):
    import io

    monkeypatch.setattr(ex, "WARM_MODULES", ("json", "not_a_module_xyz"))
    task = {"runtime_api_address": "a:1", "token": "t", "insecure": True}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(task) + "\n"))
    got = ex.await_task()
    assert got.token == "t" and got.runtime_api_address == "a:1"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert ex.await_task() is None


# A real fork server (`serve_forks`) whose children run a stand-in for the
# gate's `run_task`: it records the child's pid, parent and task, then exits
# the way Flower's runner does (sys.exit), or raises.
FORK_SERVER = """
import json, os, pathlib, sys
sys.path.insert(0, sys.argv[2])
import client.executor as ex
import client.gate as gate
out = pathlib.Path(sys.argv[1])
ex.WARM_MODULES = ("json",)

def run_task(site_yaml, args):
    import numpy as np
    rec = {"pid": os.getpid(), "ppid": os.getppid(), "token": args.token,
           "site": site_yaml, "stdin": sys.stdin.read(),
           "draw": float(np.random.rand())}
    (out / f"task-{args.token}.json").write_text(json.dumps(rec))
    if args.token == "boom":
        raise RuntimeError("task failed")
    sys.exit(0)

gate.run_task = run_task
(out / "server.pid").write_text(str(os.getpid()))
ex.serve_forks("site.yaml")
(out / "server.eof").write_text("")
"""


def test_fork_server_forks_a_child_per_task_and_survives_a_failing_one(tmp_path):
    import subprocess

    script = tmp_path / "server.py"
    script.write_text(FORK_SERVER)
    root = str(Path(ex.__file__).resolve().parents[1])
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), root],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        for token in ("a", "boom", "b"):
            proc.stdin.write(json.dumps({"token": token, "insecure": True}) + "\n")
            proc.stdin.flush()
            _wait(lambda t=token: (tmp_path / f"task-{t}.json").exists())
        proc.stdin.close()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    server = int((tmp_path / "server.pid").read_text())
    recs = {t: json.loads((tmp_path / f"task-{t}.json").read_text()) for t in "ab"}
    assert (tmp_path / "server.eof").exists()  # a failing task did not end it
    for rec in recs.values():
        assert rec["ppid"] == server and rec["pid"] != server
        assert rec["stdin"] == ""  # the child does not see the task pipe
        assert rec["site"] == "site.yaml"
    assert recs["a"]["pid"] != recs["b"]["pid"]
    assert recs["a"]["draw"] != recs["b"]["draw"]  # reseeded like a new process


def test_warm_imports_leave_cuda_uninitialised():
    """A forked child can only use CUDA if its server never touched it."""
    import subprocess

    code = (
        "import client.executor as ex; ex.warm_imports(); import torch; "
        "assert not torch.cuda.is_initialized(); print('ok')"
    )
    root = str(Path(ex.__file__).resolve().parents[1])
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
