"""Docker files and the lock files agree with the code (Docker itself cannot
run here or in CI). docs/builds.md says what is locked and how it is updated."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from cli.main import build_parser
from common.config import SiteConfig

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
REQ = ROOT / "requirements"
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


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """A lock file as {canonical name: (version, sha256 hashes)}."""
    text = (REQ / name).read_text()
    entries: dict[str, tuple[str, list[str]]] = {}
    for entry in re.sub(r"\\\n", " ", text).splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        m = re.fullmatch(
            r"([A-Za-z0-9_.-]+)==([\w.+!-]+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", entry
        )
        assert m, f"{name}: not a pinned, hashed requirement: {entry!r}"
        key = canonicalize_name(m[1])
        assert key not in entries, f"{name}: {key} twice"
        entries[key] = (m[2], re.findall(r"sha256:([0-9a-f]{64})", m[3]))
    return entries


def _admits(req: Requirement, version: str) -> bool:
    return req.specifier.contains(Version(version), prereleases=True)


def _run_commands() -> list[str]:
    """Each `RUN` of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", _dockerfile())
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


LOCKS = ("pip.lock", "tools.lock", "runtime.lock", "dev.lock", "build.lock")


@pytest.mark.parametrize("name", LOCKS)
def test_locks_pin_every_distribution_by_version_and_hash(name):
    lock = _lock(name)
    assert lock
    for key, (_version, hashes) in lock.items():
        assert hashes, f"{name}: {key} has no --hash"
    # No index, find-links or editable lines: a lock works on any machine.
    for line in (REQ / name).read_text().splitlines():
        assert not line.startswith("-"), f"{name}: {line}"


def test_runtime_lock_admits_every_pyproject_dependency():
    runtime = _lock("runtime.lock")
    for dep in _project()["project"]["dependencies"]:
        req = Requirement(dep)
        key = canonicalize_name(req.name)
        assert key in runtime, f"{req.name} is not in requirements/runtime.lock"
        assert _admits(req, runtime[key][0]), f"runtime.lock: {key} {runtime[key][0]}"


def test_dev_lock_is_the_runtime_lock_plus_the_dev_tools():
    runtime, dev = _lock("runtime.lock"), _lock("dev.lock")
    for key, entry in runtime.items():
        assert dev.get(key) == entry, f"dev.lock and runtime.lock differ on {key}"
    for dep in _project()["project"]["optional-dependencies"]["dev"]:
        req = Requirement(dep)
        key = canonicalize_name(req.name)
        assert key in dev and _admits(req, dev[key][0]), f"dev.lock: {req.name}"


def test_build_and_tool_locks_agree_with_the_others():
    dev, build = _lock("dev.lock"), _lock("build.lock")
    for dep in _project()["build-system"]["requires"]:
        req = Requirement(dep)
        key = canonicalize_name(req.name)
        assert key in build and _admits(req, build[key][0]), f"build.lock: {req.name}"
    for key in build.keys() & dev.keys():  # installed together by make setup
        assert build[key] == dev[key], f"build.lock and dev.lock differ on {key}"
    pip = _lock("pip.lock")
    assert set(pip) == {"pip"}
    assert f"pip=={pip['pip'][0]}" in (REQ / "pip.in").read_text().split()
    assert _lock("tools.lock")["pip"] == pip["pip"]


def test_torch_is_locked_as_the_cpu_build():
    pins = _pins()
    runtime = _lock("runtime.lock")
    assert runtime["torch"][0] == f"{pins['torch']}+cpu"
    lines = (REQ / "torch-cpu.txt").read_text().splitlines()
    assert f"torch=={pins['torch']}+cpu" in lines, "run requirements/update.sh"


def test_images_pin_the_pyproject_versions():
    """The images install exactly runtime.lock, which holds pyproject's pins."""
    text = _dockerfile()
    pins = _pins()
    assert {"torch", "flwr", "monai", "opacus"} <= set(pins)
    runtime = _lock("runtime.lock")
    for name, version in pins.items():
        locked = runtime[canonicalize_name(name)][0]
        assert locked.split("+")[0] == version, (
            f"{name}: lock {locked}, pyproject {version}"
        )
    assert "ARG RUNTIME_LOCK=requirements/runtime.lock" in text
    install = "--require-hashes --extra-index-url ${TORCH_INDEX} -r ${RUNTIME_LOCK}"
    assert f"pip install {install}" in text
    # No version of its own that could drift from the lock.
    assert not re.findall(r"[A-Za-z0-9_.\]-]+==[\w.]+", text)
    assert "python:3.11" in text


def test_images_start_from_a_base_pinned_by_digest():
    stages: set[str] = set()
    froms = re.findall(r"^FROM (\S+) AS (\w+)$", _dockerfile(), re.M)
    assert len(froms) == len(re.findall(r"^FROM ", _dockerfile(), re.M))
    for image, stage in froms:
        assert image in stages or re.fullmatch(
            r"python:3\.11-slim@sha256:[0-9a-f]{64}", image
        ), f"FROM {image}: neither an earlier stage nor pinned by digest"
        stages.add(stage)


def test_images_install_only_hash_checked_files():
    installs = [
        cmd.strip()
        for run in _run_commands()
        for cmd in run.split("&&")
        if re.search(r"\bpip (install|wheel)\b", cmd)
    ]
    assert installs
    for cmd in installs:
        local = "--no-deps" in cmd and re.search(r"(/wheels/\S+\.whl| \.)$", cmd)
        assert "--require-hashes" in cmd or local, cmd
    assert "python -m pip install --require-hashes -r requirements/pip.lock" in installs
    assert "pip install --require-hashes -r requirements/build.lock" in installs


def test_setup_installs_the_locks_with_hash_checking():
    makefile = (ROOT / "Makefile").read_text()
    locks = re.search(r"^LOCKS := (.+)$", makefile, re.M)[1].split()
    assert {"requirements/pip.lock", "requirements/dev.lock"} <= set(locks)
    assert "requirements/build.lock" in locks
    assert re.search(r"^\$\(STAMP\): pyproject\.toml \$\(LOCKS\)$", makefile, re.M)
    recipe = makefile.split("$(STAMP): ", 1)[1].split("\n\n", 1)[0]
    pip_lines = [line.strip() for line in recipe.splitlines() if "pip install" in line]
    assert pip_lines == [
        "$(BIN)/python -m pip install --quiet --require-hashes -r "
        "requirements/pip.lock",
        "$(BIN)/pip install --quiet --require-hashes -r requirements/dev.lock",
        "$(BIN)/pip install --quiet --require-hashes -r requirements/build.lock",
        "$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make setup" in ci and "make test" in ci


def test_the_environment_is_the_locked_one():
    """What `make setup` installed is what the locks say (CI runs this in the
    .venv it has just built; locally, `make setup` after a lock changes)."""
    from importlib.metadata import PackageNotFoundError, version

    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not running in the project's .venv")
    wrong = []
    for name in ("pip.lock", "dev.lock"):
        for key, (locked, _hashes) in _lock(name).items():
            try:
                installed = version(key)
            except PackageNotFoundError:
                installed = None
            if installed is None or Version(installed) != Version(locked):
                wrong.append(f"{key}: locked {locked}, installed {installed}")
    assert not wrong, "run make setup: " + "; ".join(wrong)


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
    # kidneyfl's Fleet gate (server/fleet_gate.py) takes its own flags, then
    # passes everything after "--" to Flower's SuperLink.
    split = cmd.index("--")
    assert cmd[1:3] == ["-m", "server.fleet_gate"]
    gate_help = subprocess.run(
        [sys.executable, "-m", "server.fleet_gate", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    for flag in (a for a in cmd[3:split] if a.startswith("--")):
        assert flag in gate_help, flag
    help_text = subprocess.run(
        [str(BIN / "flower-superlink"), "--help"], capture_output=True, text=True
    ).stdout
    for flag in (a for a in cmd[split + 1 :] if a.startswith("--")):
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
    for name in ("ca.crt", "server.pem", "server.key"):  # never the CA's key
        assert f"./certs/{name}:/certs/{name}:ro" in coord["volumes"]
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
