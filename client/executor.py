"""The site's executor: Flower's SuperExec loop, ClientApps launched via the gate.

``kidneyfl site executor SITE_YAML`` runs in place of ``flower-superexec``
beside a SuperNode started with ``--isolation process``. It is Flower's own
``run_superexec`` loop (auth, retries, shutdown, parent monitoring unchanged)
with :class:`GateExecutor` in place of Flower's ``SubprocessExecutor``: it
launches only ClientApp tasks, each as ``python -m client.executor task``,
which is Flower's ClientApp runner behind the approval check
(:func:`client.gate.run_task`). :func:`run_governed` starts the SuperNode and
the executor together (what ``kidneyfl site start`` should run when
``governance.require_approval`` is on).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.config import ConfigError, SiteConfig, load_site_config

log = logging.getLogger("kidneyfl.executor")


class GateExecutor:
    """Flower SuperExec executor that starts ClientApp tasks behind the gate."""

    def __init__(self, site_yaml: str) -> None:
        self.site_yaml = str(Path(site_yaml).resolve())

    def get_eligible_capacity(self, supported: set, **_: Any) -> tuple[set, set]:
        """Only ClientApp tasks; a SuperNode has no other kind."""
        from flwr.supercore.constant import TaskType

        return {t for t in supported if t == TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, *_: Any, **__: Any) -> None:
        """No capacity gate: one process per task, as Flower's own executor."""

    def launch(self, spec: Any) -> Any:
        """Start ``python -m client.executor task`` for a ClientApp task."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(
                f"the site runs ClientApps only, not {spec.task_type}"
            )
        cmd = [*task_command(self.site_yaml), "--runtime-api-address"]
        cmd += [spec.runtime_api_address, "--token", spec.token]
        if spec.insecure:
            cmd.append("--insecure")
        elif spec.root_certificates_path:
            cmd += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            cmd += ["--parent-pid", str(spec.parent_pid)]
        subprocess.Popen(cmd)  # noqa: S603 - our own interpreter and module
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Nothing pooled."""

    def close(self) -> None:
        """Nothing held."""


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
    executor = GateExecutor(str(site.source))
    # run_superexec builds its executor through this module-level factory; it is
    # the one thing swapped, so Flower's own loop, auth and shutdown stay as is.
    rs.get_executor = lambda *a, **k: executor
    rs.run_superexec(
        runtime_api_address=f"127.0.0.1:{site.federation.clientappio_port}",
        insecure=True,  # the SuperNode's local API: plain HTTP on loopback only
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def run_governed(site_yaml: str | Path) -> int:
    """The site's SuperNode (``--isolation process``) and its gate executor.

    What ``kidneyfl site start`` runs when ``governance.require_approval`` is on:
    both processes, stopped together (SIGTERM/SIGINT reach both; if one exits
    the other is stopped). Returns the exit code of the one that ended first.
    """
    import signal
    import time

    site = load_site_config(site_yaml)
    env = supernode_env_for(site)
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    node = subprocess.Popen(isolated_supernode_command(site), env=env)
    cmd = [*executor_command(site), "--parent-pid", str(os.getpid())]
    execu = subprocess.Popen(cmd, env=env)
    procs = (node, execu)

    def stop(*_: Any) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while all(proc.poll() is None for proc in procs):
        time.sleep(0.5)
    stop()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    first = node if node.returncode is not None else execu
    return int(first.returncode or 0)


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
    t.add_argument("--runtime-api-address", required=True)
    t.add_argument("--token", required=True)
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

        run_task(args.site_yaml, args)


if __name__ == "__main__":
    main()
