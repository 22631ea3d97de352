"""Shared fixtures: tiny synthetic sites written to disk as NIfTI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import Plan, SiteConfig, load_site_config
from sim.phantoms.ct import load_profile
from sim.phantoms.io import write_site

TINY_SCALE = 5.0  # coarse voxels: a case is a few thousand voxels


def write_site_yaml(
    tmp: Path,
    name: str,
    cases: int = 6,
    profile: str = "standard-nephro",
    privacy: dict | None = None,
    seed: int = 1,
    generate: bool = True,
) -> Path:
    """A site YAML (and its phantom cases) under ``tmp``; returns the YAML path."""
    root = tmp / "data" / name
    if generate:
        write_site(root, load_profile(profile), cases, seed=seed, scale=TINY_SCALE)
    doc = {
        "name": name,
        "data": {"root": str(root), "validation_fraction": 0.34},
        "device": "cpu",
        "state_dir": str(tmp / "state" / name),
        # tiny sites have 2 validation cases: their explicit choice is to release
        # aggregates over that few (the default floor is 5 patients)
        "privacy": {"min_cases_for_aggregates": 1}
        | (privacy or {"enabled": True, "max_epsilon": 100.0, "delta": 1e-3}),
        "phantom": {
            "profile": profile,
            "cases": cases,
            "seed": seed,
            "scale": TINY_SCALE,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def tiny_plan() -> Plan:
    """A plan sized for tests: 32^3 patches at coarse spacing."""
    return Plan.model_validate(
        {"spacing-mm": "6,6,8", "patch-size": "32,32,16", "batch-size": 2}
    )


@pytest.fixture
def tiny_site(tmp_path: Path) -> SiteConfig:
    """A site with six tiny phantom cases."""
    return load_site_config(write_site_yaml(tmp_path, "tiny"))
