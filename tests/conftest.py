"""Shared fixtures: a tiny plan, a tiny phantom site, Flower's task identity.

Builders and test doubles that are not fixtures live in ``tests/fakes.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import Plan, SiteConfig, load_site_config
from tests.fakes import TINY_PLAN, write_site_yaml


@pytest.fixture
def tiny_plan() -> Plan:
    """A plan sized for tests: 32^3 patches at coarse spacing."""
    # and the model and training these tests were written for (the plan
    # schema's defaults before they became the demo's, issue 18)
    trained = {"model": "unet-small", "num-server-rounds": 4, "local-epochs": 1}
    return Plan.model_validate({**TINY_PLAN, **trained, "learning-rate": 0.003})


@pytest.fixture
def tiny_site(tmp_path: Path) -> SiteConfig:
    """A site with six tiny phantom cases."""
    return load_site_config(write_site_yaml(tmp_path, "tiny"))


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's task identity, which messages built outside a running ServerApp
    need; modules that build messages request it with
    ``pytestmark = pytest.mark.usefixtures("task_identity")``."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    yield
