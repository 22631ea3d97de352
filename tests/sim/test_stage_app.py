"""The app copy `kidneyfl simulate` hands to `flwr run`: exactly Flower's files."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.utils import collect_files, filter_paths_for_publish

from sim.cli import register
from sim.runner import (
    PROJECT_DIR,
    _federation_config,
    default_cpus_per_site,
    ray_cpus,
    stage_app,
)


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_stage_keeps_what_flower_keeps_and_skips_ignored_folders(tmp_path):
    root = tmp_path / "proj"
    files = {
        ".gitignore": "data/\nruns/\n*.log\n",
        "pyproject.toml": "[project]\nname = 'x'\n",
        "pkg/a.py": "A = 1\n",
        "pkg/conf.yaml": "k: 1\n",
        "pkg/notes.txt": "not a source file\n",
        "pkg/__pycache__/a.cpython-311.py": "",
        "data/big.py": "ignored folder\n",
        "runs/r/metrics.json": "{}\n",
        ".venv/lib/site.py": "a virtual environment\n",
        "deep/x/y.md": "# doc\n",
        "skip.log": "ignored file\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    want = set(filter_paths_for_publish(collect_files(root)))
    staged = stage_app(tmp_path / "stage", root)
    assert _tree(staged) == want
    assert want == {
        ".gitignore",
        "pyproject.toml",
        "pkg/a.py",
        "pkg/conf.yaml",
        "deep/x/y.md",
    }
    (root / "pkg/new.py").write_text("B = 2\n")  # staging again starts clean
    (staged / "stale.py").write_text("")
    assert _tree(stage_app(staged, root)) == want | {"pkg/new.py"}


def test_bundle_from_the_stage_is_byte_identical_to_flowers(tmp_path):
    staged = stage_app(tmp_path / "app")
    assert build_fab_from_disk(staged) == build_fab_from_disk(PROJECT_DIR)


@pytest.mark.parametrize(
    ("sites", "cores", "expected"),
    [(3, 2, 1), (1, 2, 2), (3, 16, 5), (100, 2, 1), (2, 2, 1), (2, 5, 2)],
)
def test_default_cpus_per_site_shares_the_cores_out(sites, cores, expected):
    assert default_cpus_per_site(sites, cores) == expected


@pytest.mark.parametrize(
    ("sites", "cores", "at_once", "threads"),
    [
        (3, 2, 3, 1),  # the demo: one wave of three, not two then one
        (2, 2, 2, 1),
        (1, 2, 1, 2),
        (4, 2, 2, 1),  # more than 1.5 x the cores: waves of `cores`
        (100, 2, 2, 1),  # memory stays that of two sites
        (3, 16, 3, 5),
        (20, 16, 20, 1),
        (25, 16, 16, 1),
        (24, 16, 24, 1),
    ],
)
def test_sites_at_once_and_their_threads(sites, cores, at_once, threads):
    """How many sites train at once (Ray's CPUs over each site's) and with how
    many threads each (Ray gives an actor floor(its CPUs))."""
    total = ray_cpus(sites, cores)
    each = default_cpus_per_site(sites, total)
    assert min(sites, total // each) == at_once
    assert each == threads
    # never more threads in all than the cores, nor more at once than sites
    assert at_once * threads <= max(cores, at_once)


def test_federation_config_tells_ray_the_sites_cpus(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cfg = _federation_config(3, None, ray_head=False)
    assert "client-resources-num-cpus=1 " in cfg and "init-args-num-cpus=3 " in cfg
    cfg = _federation_config(5, None, ray_head=False)
    assert "client-resources-num-cpus=1 " in cfg and "init-args-num-cpus=2 " in cfg


def test_default_cpus_per_site_refuses_no_sites():
    with pytest.raises(ValueError, match="at least one site"):
        default_cpus_per_site(0, 2)
    with pytest.raises(ValueError, match="at least one site"):
        ray_cpus(0, 2)


def test_simulate_cli_leaves_cpus_to_the_default():
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="cmd"))
    assert ap.parse_args(["simulate"]).cpus_per_site is None
    assert ap.parse_args(["simulate", "--cpus-per-site", "3"]).cpus_per_site == 3
