"""Docker files agree with the code (Docker itself cannot run here or in CI)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from cli.main import build_parser
from common.config import SiteConfig

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    out = {}
    for d in deps:
        m = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([\w.]+)$", d)
        if m:
            out[m.group(1)] = m.group(3)
    return out


def _dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _entrypoints() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    stage = None
    for line in _dockerfile().splitlines():
        m = re.match(r"FROM \S+ AS (\w+)", line)
        if m:
            stage = m.group(1)
        if line.startswith("ENTRYPOINT") and stage:
            stages[stage] = yaml.safe_load(line.removeprefix("ENTRYPOINT").strip())
    return stages


def test_images_pin_the_pyproject_versions():
    text = _dockerfile()
    pins = _pins()
    assert {"torch", "flwr", "monai", "opacus"} <= set(pins)
    for name, version in pins.items():
        found = re.findall(rf"{re.escape(name)}(?:\[[^\]]*\])?==([\w.]+)", text)
        assert found == [version] * len(found) and found, f"{name} not pinned"
    assert "python:3.11" in text


def test_images_run_as_non_root_and_keep_state_in_a_volume():
    text = _dockerfile()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and all(u not in ("root", "0") for u in users)
    assert 'VOLUME ["/state"]' in text
    assert set(_entrypoints()) == {"site", "coordinator"}


def test_entrypoints_parse_with_the_cli():
    parser = build_parser()
    for stage, cmd in _entrypoints().items():
        assert cmd[0] == "kidneyfl", stage
        args = parser.parse_args(cmd[1:])  # raises SystemExit on a bad flag
        assert callable(args.func)
    coord = parser.parse_args(_entrypoints()["coordinator"][1:])
    assert coord.host == "0.0.0.0" and coord.port == 9092
    assert coord.certs == "/certs" and coord.state == "/state"


def test_flower_flags_used_exist_in_installed_flower(tmp_path):
    from server.deploy import superlink_command

    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("x")
    cmd = superlink_command(certs, tmp_path / "state")
    help_text = subprocess.run(
        [str(BIN / "flower-superlink"), "--help"], capture_output=True, text=True
    ).stdout
    for flag in (a for a in cmd if a.startswith("--")):
        assert flag in help_text, flag
    node_help = subprocess.run(
        [str(BIN / "flower-supernode"), "--help"], capture_output=True, text=True
    ).stdout
    src = (ROOT / "client" / "node.py").read_text()
    for flag in set(re.findall(r'"(--[a-z-]+)"', src)):
        assert flag in node_help, flag


def test_compose_matches_images_sites_and_certificates():
    compose = _compose()
    services = compose["services"]
    coord = services["coordinator"]
    assert coord["build"]["target"] == "coordinator"
    assert "9092:9092" in coord["ports"]
    assert "./certs:/certs:ro" in coord["volumes"]
    hospitals = [s for s in services if s.startswith("hospital-")]
    assert len(hospitals) == 3
    for name in hospitals:
        svc = services[name]
        assert svc["build"]["target"] == "site"
        vols = {v.split(":")[1]: v for v in svc["volumes"]}
        assert vols["/data"].endswith(":ro"), "hospital data must be read-only"
        assert vols["/config/site.yaml"].endswith(":ro")
        assert vols["/keys/node"].endswith(":ro")
        assert not vols["/state"].endswith(":ro")
        site_file = DOCKER / vols["/config/site.yaml"].split(":")[0]
        doc = yaml.safe_load(site_file.read_text())
        site = SiteConfig.model_validate(doc)  # schema-valid
        assert site.name == name
        assert str(site.data.root) == "/data" and str(site.state_dir) == "/state"
        fed = site.federation
        assert fed is not None and not fed.insecure
        host, port = fed.superlink.split(":")
        assert host == "coordinator" and int(port) == 9092
        assert str(fed.root_certificates) == "/certs/ca.crt"
        assert str(fed.auth_key) == "/keys/node"


def test_compose_steps_use_real_commands():
    header = [
        line.lstrip("# ").strip()
        for line in (DOCKER / "compose.yaml").read_text().splitlines()
        if line.startswith("#")
    ]
    text = " ".join(header)
    assert "make-certs.sh" in text and "DNS:coordinator" in text
    parser = build_parser()
    for m in re.finditer(r"kidneyfl (site keygen [^;]+);", text):
        args = parser.parse_args(shlex.split(m.group(1).replace("$s", "a")))
        assert args.func.__name__ == "_keygen"
    assert "flwr supernode register" in text and "--name hospital-$s" in text
    plan = tomllib.loads((DOCKER / "plan.toml").read_text())
    from common.config import load_plan

    load_plan({**_default_run_config(), **plan})  # the Docker plan validates
    assert plan["out-dir"].startswith("/state/")


def _default_run_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"
    ]


@pytest.mark.parametrize("path", ["sites/plan.toml", "docker/plan.toml"])
def test_plan_files_only_use_known_keys(path):
    plan = tomllib.loads((ROOT / path).read_text())
    assert set(plan) <= set(_default_run_config())


NOT_IN_IMAGE = ("sim", "tests", "benchmarks")


def test_image_code_runs_without_what_the_dockerfile_leaves_out(tmp_path):
    """The images copy only some packages (no sim/): the entrypoints and both
    Flower apps must import and parse from exactly those."""
    import shutil

    copied = re.findall(r"^COPY (\w+) \./\1$", _dockerfile(), re.M)
    assert {"client", "common", "server", "cli"} <= set(copied)
    assert "sim" not in copied  # the bundle a hospital approves has no sim code
    for pkg in copied:
        shutil.copytree(
            ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__")
        )
    probe = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {NOT_IN_IMAGE!r}:\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import cli.main, client.app, server.app\n"
        "p = cli.main.build_parser()\n"
        f"for cmd in {list(_entrypoints().values())!r}:\n"
        "    assert callable(p.parse_args(cmd[1:]).func)\n"
        "assert cli.main.__file__.startswith(sys.argv[1])\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
