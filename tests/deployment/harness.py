"""A real deployment on 127.0.0.1 for tests: SuperLink, SuperNodes, `flwr run`.

Everything is started the way the README's runbook says (the same command
builders), on free ports, and stopped by PID, process tree included, even when
a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
import yaml

from server.deploy import superlink_command, write_connection
from sim.runner import PROJECT_DIR, stage_app
from sim.superlink import descendants, free_port, terminate
from tests.fakes import write_site_yaml

CONNECTION = "consortium"
BIN = Path(sys.executable).parent
RUNBOOK = PROJECT_DIR / "docs" / "deployment.md"


def runbook() -> dict[str, str]:
    """The runbook's tagged command blocks, by tag."""
    text = RUNBOOK.read_text()
    blocks = re.findall(r"<!-- runbook:([\w-]+) -->\s*```bash\n(.*?)```", text, re.S)
    return {tag: body.strip() for tag, body in blocks}


def run_cli(
    args: list[str], env: dict, timeout: float = 120
) -> subprocess.CompletedProcess:
    """A command to completion, output captured."""
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Proc:
    """A started service and its log."""

    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process and everything it started."""
        tree = descendants(self.popen.pid)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        terminate(tree + [p for p in descendants(self.popen.pid) if p not in tree], 5)

    def kill_tree(self) -> None:
        """SIGKILL the process and its descendants at once (a crash)."""
        tree = [self.popen.pid, *descendants(self.popen.pid)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(10)
        terminate(tree, 1)

    def text(self) -> str:
        """The log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Deployment:
    """One coordinator and N hospitals on this machine."""

    root: Path
    tls: bool = True
    auth: bool = True
    port: int = 0
    operator_port: int = 0
    procs: dict[str, Proc] = field(default_factory=dict)
    sites: dict[str, Path] = field(default_factory=dict)
    node_ids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.operator_port = self.operator_port or free_port()
        self.certs = self.root / "certs"
        self.state = self.root / "coordinator"
        self.home = self.root / "flwr-cli"
        self.env = dict(os.environ)
        self.env.update(
            FLWR_HOME=str(self.home),
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_TELEMETRY_ENABLED="0",
            PYTHONUNBUFFERED="1",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            CERTS=str(self.certs),
            CA_DIR=str(self.root / "ca-offline"),
            STATE=str(self.state),
            SAN="IP:127.0.0.1,DNS:localhost",
            SUPERLINK=f"127.0.0.1:{self.port}",
            BIND="127.0.0.1",
            PORT=str(self.port),
            OPERATOR_PORT=str(self.operator_port),
            OPERATOR=f"127.0.0.1:{self.operator_port}",
        )
        self.book = runbook()
        if self.tls and not (self.certs / "server.pem").exists():
            res = self.step("certs")
            assert res.returncode == 0, res.stdout + res.stderr

    def step(
        self, tag: str, cwd: Path = PROJECT_DIR, **env: str
    ) -> subprocess.CompletedProcess:
        """Run one runbook block to completion (from the repository root)."""
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self.book[tag]],
            env={**self.env, **env},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def start_step(
        self, name: str, tag: str, cwd: Path = PROJECT_DIR, **env: str
    ) -> Proc:
        """Start a long-running runbook block in the background (exec'd, so the
        PID is the service's own)."""
        block = self.book[tag]
        script = block if "\n" in block else "exec " + block
        return self._start(name, ["bash", "-c", script], {**self.env, **env}, cwd)

    @property
    def app(self) -> Path:
        """The app's files as `flwr run .` bundles them, copied once per
        deployment (``sim.runner.stage_app``: a byte-identical bundle,
        without walking the virtual environment on every run)."""
        staged = self.root / "app"
        if not (staged / "pyproject.toml").exists():
            stage_app(staged)
        return staged

    @property
    def address(self) -> str:
        """The hospitals' door (Fleet API)."""
        return f"127.0.0.1:{self.port}"

    @property
    def operator_address(self) -> str:
        """The operators' door (Control API; TLS deployments)."""
        return f"127.0.0.1:{self.operator_port}"

    def _start(
        self, name: str, cmd: list[str], env: dict, cwd: Path = PROJECT_DIR
    ) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                cmd,
                env=env,
                cwd=cwd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> Proc:
        """The coordinator's SuperLink; returns once its port answers."""
        if self.tls and self.auth:
            proc = self.start_step("superlink", "superlink")
            wait_port(self.port, proc)
            res = self.step("connect")
            assert res.returncode == 0, res.stdout + res.stderr
            return proc
        env = dict(self.env, FLWR_HOME=str(self.state / "flwr"))
        if self.tls:
            cmd = superlink_command(
                self.certs,
                self.state,
                "127.0.0.1",
                self.port,
                auth=self.auth,
                operator_port=self.operator_port,
            )
        else:
            cmd = [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--database",
                str(self.state / "superlink.db"),
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
        self.state.mkdir(parents=True, exist_ok=True)
        proc = self._start("superlink", cmd, env)
        wait_port(self.port, proc)
        write_connection(
            self.home,
            CONNECTION,
            self.operator_address if self.tls else self.address,
            self.certs / "ca.crt" if self.tls else None,
            insecure=not self.tls,
        )
        return proc

    def add_site(
        self,
        name: str,
        cases: int = 6,
        seed: int = 0,
        approval: bool = False,
        **kw: object,
    ) -> Path:
        """Phantom data, a node key pair and a site YAML with a federation block."""
        yml = write_site_yaml(self.root, name, cases=cases, seed=seed, **kw)
        doc = yaml.safe_load(yml.read_text())
        fed: dict[str, object] = {
            "superlink": self.address,
            "clientappio_port": free_port(),
        }
        if self.tls:
            fed["root_certificates"] = str(self.certs / "ca.crt")
        else:
            fed["insecure"] = True
        if self.auth:
            key = self.root / "keys" / name
            res = self.step("keygen", SITE=name, KEY=str(key))
            assert res.returncode == 0, res.stdout + res.stderr
            fed["auth_key"] = str(key)
        doc["federation"] = fed
        # Bundle approval is tested in tests/deployment/test_governance_deploy.py; here
        # the SuperNode runs ClientApps directly (the development setting).
        doc["governance"] = {"require_approval": approval}
        # Several sites share this machine's cores: one torch thread each, as
        # a hospital sharing a server would set (more threads than cores make
        # every step slower).
        doc.setdefault("cpu_threads", 1)
        yml.write_text(yaml.safe_dump(doc))
        self.sites[name] = yml
        return yml

    def publish(self) -> tuple[Path, str]:
        """The runbook's bundle and its published SHA-256, built from the app
        exactly as `flwr run .` will ship it (moved out of the app folder)."""
        res = self.step("publish", cwd=self.app)
        assert res.returncode == 0, res.stdout + res.stderr
        digest, name = res.stdout.strip().splitlines()[-1].split()
        bundle = self.root / Path(name).name
        (self.app / name).replace(bundle)
        return bundle, digest

    def approve(self, name: str, bundle: Path, digest: str) -> None:
        """The runbook's approval of ``bundle`` at site ``name``."""
        res = self.step(
            "approve",
            SITE_YAML=str(self.sites[name]),
            BUNDLE=str(bundle),
            PUBLISHED_SHA256=digest,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert digest in res.stdout, res.stdout

    def register(self, name: str) -> subprocess.CompletedProcess:
        """`flwr supernode register` of the site's public key, as the consortium."""
        pub = self.root / "keys" / f"{name}.pub"
        res = run_cli(
            [
                str(BIN / "flwr"),
                "supernode",
                "register",
                str(pub),
                CONNECTION,
                "--name",
                name,
            ],
            self.env,
        )
        found = re.search(r"SuperNode (\d+) registered", res.stdout)
        if found:
            self.node_ids[name] = found.group(1)
        return res

    def start_site(self, name: str) -> Proc:
        """The site's SuperNode from its YAML (what `kidneyfl site start` runs)."""
        return self.start_step(
            f"site-{name}", "supernode", SITE=name, SITE_YAML=str(self.sites[name])
        )

    def online(self) -> dict[str, str]:
        """`flwr supernode list`: status by registered name."""
        res = run_cli(
            [str(BIN / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
            self.env,
        )
        try:
            nodes = json.loads(res.stdout).get("nodes", [])
        except ValueError:
            return {}
        names = {v: k for k, v in self.node_ids.items()}
        return {
            names.get(str(n.get("node-id")), str(n.get("node-id"))): str(
                n.get("status")
            )
            for n in nodes
        }

    def wait_online(self, names: list[str], timeout: float = 90) -> None:
        """Until every named site shows as online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.online()
            if all(status.get(n) == "online" for n in names):
                return
            time.sleep(1)
        raise TimeoutError(f"sites not online after {timeout} s: {self.online()}")

    def submit(
        self, run_name: str, out_dir: Path, plan: dict, resume: bool = False
    ) -> Proc:
        """The runbook's `flwr run . consortium --stream -c "$PLAN"` (or resume)."""
        config = {k: v for k, v in plan.items() if k != "resume"}
        config.update({"out-dir": str(out_dir), "run-name": run_name, "resume": False})
        path = self.root / f"{run_name}-{int(time.time() * 1000)}.toml"
        path.write_text(tomli_w.dumps(config))
        return self.start_step(
            f"run-{run_name}-{len(self.procs)}",
            "resume" if resume else "run",
            cwd=self.app,
            PLAN=str(path),
        )

    def stop_all(self) -> None:
        """Stop every process this deployment started (runs first)."""
        for proc in sorted(self.procs.values(), key=lambda p: p.name == "superlink"):
            proc.stop()


def wait_port(port: int, proc: Proc, timeout: float = 60) -> None:
    """Until 127.0.0.1:port accepts connections (or the process died)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.text()[-2000:]}")
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        time.sleep(0.3)
    raise TimeoutError(f"{proc.name} did not open port {port}")


def wait_for(predicate, timeout: float, what: str, step: float = 0.5):  # noqa: ANN001
    """Poll ``predicate`` until truthy; its value, or TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl rounds."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
