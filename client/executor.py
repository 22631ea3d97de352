"""The site's executor: Flower's SuperExec loop, ClientApps launched via the gate.

``kidneyfl site executor SITE_YAML`` runs in place of ``flower-superexec``
beside a SuperNode started with ``--isolation process``. It is Flower's own
``run_superexec`` loop (auth, retries, shutdown, parent monitoring unchanged)
with :class:`GateExecutor` in place of Flower's ``SubprocessExecutor``: it
launches only ClientApp tasks, each as ``python -m client.executor task``,
which is Flower's ClientApp runner behind the approval check
(:func:`client.gate.run_task`). :func:`run_governed` starts the SuperNode and
the executor together and keeps them together (what ``kidneyfl site start``
runs when ``governance.require_approval`` is on; :mod:`client.supervise`).

Warm start: Flower starts a fresh interpreter per message, which spends
seconds of CPU importing torch, MONAI and Opacus before any work. With
``federation.warm_clientapp`` (the default) the executor keeps one *fork
server*: a process that has imported those libraries once (never the bundle's
code) and reads tasks from a pipe; for each task it forks a child, which
starts with the libraries already in memory and runs the task behind the gate.
Each task still gets its own process, and the bundle is imported only in that
child, after the gate approves it. Where ``os.fork`` does not exist, the
executor keeps one warm *spare* process instead, used once and replaced at
once (the import cost is then paid per task, off the message's path).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from common.config import ConfigError, SiteConfig, load_site_config

if TYPE_CHECKING:
    from client.supervise import Backoff

log = logging.getLogger("kidneyfl.executor")


# Third-party libraries a spare imports while it waits (the site's installed
# versions; the bundle ships only kidneyfl's own code).
WARM_MODULES = (
    "numpy",
    "torch",
    "monai",
    "monai.networks.nets",
    "monai.inferers",
    "monai.metrics",
    "opacus",
    "nibabel",
    "flwr.supernode.runtime.run_clientapp",
)


class GateExecutor:
    """Flower SuperExec executor that starts ClientApp tasks behind the gate."""

    def __init__(
        self, site_yaml: str, warm: bool = False, fork: bool | None = None
    ) -> None:
        self.site_yaml = str(Path(site_yaml).resolve())
        self.warm = warm
        # Warm start through a fork server where the OS can fork, else spares.
        self.fork = hasattr(os, "fork") if fork is None else fork
        self._spare: subprocess.Popen | None = None  # the fork server or a spare
        self._tasks: list[subprocess.Popen] = []
        self.handed_to_spare = 0  # tasks that started warm

    def get_eligible_capacity(self, supported: set, **_: Any) -> tuple[set, set]:
        """Only ClientApp tasks; a SuperNode has no other kind."""
        from flwr.supercore.constant import TaskType

        return {t for t in supported if t == TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, *_: Any, **__: Any) -> None:
        """No capacity gate: one process per task, as Flower's own executor."""

    def launch(self, spec: Any) -> Any:
        """Run a ClientApp task behind the gate: in the warm spare, or a new process."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(
                f"the site runs ClientApps only, not {spec.task_type}"
            )
        task = {
            "runtime_api_address": spec.runtime_api_address,
            "token": spec.token,
            "insecure": bool(spec.insecure),
            "root_certificates": None if spec.insecure else spec.root_certificates_path,
            "parent_pid": spec.parent_pid,
        }
        if self._hand_to_warm(task):
            return LaunchResult.accepted()
        cmd = [*task_command(self.site_yaml), "--runtime-api-address"]
        cmd += [task["runtime_api_address"], "--token", task["token"]]
        if task["insecure"]:
            cmd.append("--insecure")
        elif task["root_certificates"]:
            cmd += ["--root-certificates", task["root_certificates"]]
        if task["parent_pid"] is not None:
            cmd += ["--parent-pid", str(task["parent_pid"])]
        self._tasks.append(subprocess.Popen(cmd))  # noqa: S603 - our interpreter
        return LaunchResult.accepted()

    def _hand_to_warm(self, task: dict) -> bool:
        """Give the task to the fork server or the spare; False: start it cold."""
        proc = self._spare
        if not self.fork:
            self._spare = None  # a spare runs one task
        if proc is None or proc.poll() is not None or proc.stdin is None:
            self._spare = None
            return False
        try:  # the token goes through the pipe, never on a command line
            proc.stdin.write(json.dumps(task) + "\n")
            if self.fork:
                proc.stdin.flush()
            else:
                proc.stdin.close()
        except OSError:
            proc.kill()
            self._spare = None
            return False
        self.handed_to_spare += 1
        if not self.fork:
            self._tasks.append(proc)
        what = "fork server" if self.fork else "process"
        log.info("task handed to the warm ClientApp %s (pid %d)", what, proc.pid)
        return True

    def reconcile(self) -> None:
        """Reap finished tasks; keep one spare waiting (warm start)."""
        self._tasks = [p for p in self._tasks if p.poll() is None]
        if self._spare is not None and self._spare.poll() is not None:
            self._spare = None  # died while idle (e.g. killed): start another
        if self.warm and self._spare is None:
            # At once, beside a running task: the next message (this round's
            # evaluate) comes seconds after the current one ends.
            flag = "--forkserver" if self.fork else "--spare"
            self._spare = subprocess.Popen(  # noqa: S603 - our interpreter and module
                [*task_command(self.site_yaml), flag],
                stdin=subprocess.PIPE,
                text=True,
            )

    def close(self) -> None:
        """Stop the fork server or idle spare (tasks end with their SuperNode)."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None:
            if spare.stdin is not None:
                spare.stdin.close()  # EOF: the spare exits on its own
            try:
                spare.wait(5)
            except subprocess.TimeoutExpired:
                spare.kill()


def warm_imports() -> None:
    """Import :data:`WARM_MODULES` (third-party only; never the bundle)."""
    import importlib

    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a library the site does not use
            log.debug("warm start: %s not installed", name)


def await_task() -> argparse.Namespace | None:
    """In a spare: warm the imports, then wait for one task on stdin.

    Returns None when stdin closes first (the executor stopped).
    """
    warm_imports()
    line = sys.stdin.readline()
    if not line.strip():
        return None
    return argparse.Namespace(**json.loads(line))


def serve_forks(site_yaml: str) -> None:
    """The fork server: warm the imports once, then fork a child per task line.

    Reads one JSON task per line from stdin until EOF. The server itself never
    runs a task, never imports the bundle, and never touches CUDA (a forked
    child could not use it then); children are reaped by the kernel.
    """
    warm_imports()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # no zombies
    while line := sys.stdin.readline():
        if not line.strip():
            continue
        task = json.loads(line)
        if _cuda_initialised():  # fail safe: a cold process for this task
            log.error("fork server: CUDA is initialised here; exiting")
            sys.exit(3)
        pid = os.fork()
        if pid == 0:
            _run_forked(site_yaml, task)
        log.info("task started in forked process %d", pid)


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _run_forked(site_yaml: str, task: dict) -> NoReturn:
    """In a forked child: run the task as a fresh process would, then exit."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the server's task pipe is not the child's
        os.close(null)
        _reseed()
        from client.gate import run_task

        run_task(site_yaml, argparse.Namespace(site_yaml=site_yaml, **task))
        code = 0
    except SystemExit as exc:  # Flower's runner ends with sys.exit(code)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001 - report, then exit the child
        log.exception("ClientApp task failed")
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _reseed() -> None:
    """Fresh entropy for the RNGs a new interpreter would seed from the OS."""
    import random

    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def task_command(site_yaml: str | Path) -> list[str]:
    """The gate's command line for one task (arguments follow)."""
    return [sys.executable, "-m", "client.executor", "task", str(site_yaml)]


def executor_command(site: SiteConfig) -> list[str]:
    """``kidneyfl site executor`` as a command line (for runbooks and tests)."""
    return [sys.executable, "-m", "client.executor", "executor", str(site.source)]


def isolated_supernode_command(site: SiteConfig) -> list[str]:
    """The site's ``flower-supernode`` command, with ClientApps left to the gate."""
    from client.node import supernode_command

    return [*supernode_command(site), "--isolation", "process"]


def run_executor(site_yaml: str | Path, parent_pid: int | None = None) -> None:
    """Flower's SuperExec loop for the site's SuperNode, with :class:`GateExecutor`.

    Raises
    ------
    ConfigError
        If the YAML has no federation block (the SuperNode's port is there).
    """
    from flwr.supercore.superexec import run_superexec as rs

    site = load_site_config(site_yaml)
    if site.federation is None:
        raise ConfigError(f"{site.source}: no federation block; see docs/deployment.md")
    if not site.governance.require_approval:
        log.warning("site %s: approval is OFF (governance.require_approval)", site.name)
    os.environ.update(supernode_env_for(site))  # the SuperNode's FLWR_HOME
    executor = GateExecutor(str(site.source), warm=site.federation.warm_clientapp)
    # run_superexec builds its executor through this module-level factory; it is
    # the one thing swapped, so Flower's own loop, auth and shutdown stay as is.
    rs.get_executor = lambda *a, **k: executor
    rs.run_superexec(
        runtime_api_address=f"127.0.0.1:{site.federation.clientappio_port}",
        insecure=True,  # the SuperNode's local API: plain HTTP on loopback only
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def run_governed(
    site_yaml: str | Path,
    restart: Backoff | None = None,
    stop_timeout: float = 20.0,
) -> int:
    """The site's SuperNode (``--isolation process``) and its gate executor.

    What ``kidneyfl site start`` runs when ``governance.require_approval`` is on,
    under :class:`client.supervise.Supervisor`: both processes and the
    ClientApps the executor starts are stopped together on SIGTERM/SIGINT/SIGHUP
    (exit 0); if the SuperNode or the executor ends on its own, one line says
    which and why, everything else is stopped, and the exit code is 3, unless
    ``restart`` starts the site again after a delay.

    Raises
    ------
    ConfigError
        If the YAML is incomplete, or the ClientAppIo port is taken.
    """
    from client.node import clientappio_port_problem
    from client.supervise import Supervisor

    site = load_site_config(site_yaml)
    env = supernode_env_for(site)
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    children = [
        ("SuperNode", isolated_supernode_command(site)),
        # Flower's own parent check as well: the executor ends if we die.
        ("executor", [*executor_command(site), "--parent-pid", str(os.getpid())]),
    ]
    return Supervisor(
        site,
        children,
        env,
        stop_timeout=stop_timeout,
        ready=lambda: clientappio_port_problem(site),
    ).run(restart)


def supernode_env_for(site: SiteConfig) -> dict[str, str]:
    """The SuperNode's environment, with this kidneyfl importable by the gate."""
    from client.node import supernode_env

    env = supernode_env(site)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, env.get("PYTHONPATH", "")) if p
    )
    return env


def main(argv: list[str] | None = None) -> None:
    """``python -m client.executor site|executor|task SITE_YAML [...]``."""
    from common.logs import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(prog="client.executor", allow_abbrev=False)
    sub = p.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("executor", allow_abbrev=False)
    e.add_argument("site_yaml")
    e.add_argument("--parent-pid", type=int, default=None)
    g = sub.add_parser("site", allow_abbrev=False)
    g.add_argument("site_yaml")
    t = sub.add_parser("task", allow_abbrev=False)
    t.add_argument("site_yaml")
    t.add_argument("--spare", action="store_true", help="take the task from stdin")
    t.add_argument(
        "--forkserver", action="store_true", help="fork a child per task on stdin"
    )
    t.add_argument("--runtime-api-address", default=None)
    t.add_argument("--token", default=None)
    t.add_argument("--insecure", action="store_true")
    t.add_argument("--root-certificates", default=None)
    t.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    if args.mode == "executor":
        run_executor(args.site_yaml, args.parent_pid)
    elif args.mode == "site":
        sys.exit(run_governed(args.site_yaml))
    else:
        from client.gate import run_task

        if args.forkserver:
            serve_forks(args.site_yaml)
            return
        if args.spare:
            task = await_task()
            if task is None:
                return
            args = argparse.Namespace(site_yaml=args.site_yaml, **vars(task))
        elif not (args.runtime_api_address and args.token):
            p.error("task needs --runtime-api-address and --token (or --spare)")
        run_task(args.site_yaml, args)


if __name__ == "__main__":
    main()
