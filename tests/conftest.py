"""Shared fixtures: a tiny plan, a tiny phantom site, Flower's task identity.

Builders and test doubles that are not fixtures live in ``tests/fakes.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import Plan, SiteConfig, load_site_config
from tests.fakes import TINY_PLAN, write_site_yaml

# `make test` runs two pytest-xdist workers with --dist loadgroup: these
# end-to-end deployment files (SuperLink and SuperNodes in subprocesses, mostly
# waiting on Flower's polls and heartbeats) on one, every other test on the
# other in the same order as a plain `pytest` run, so that no test meets an
# order of predecessors it was never run after.
DEPLOYMENT_GROUP = frozenset(
    {
        "tests/deployment/test_deployment.py",
        "tests/deployment/test_governance_deploy.py",
        "tests/deployment/test_superlink_db.py",
    }
)


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    root = Path(str(config.rootpath))
    for item in items:
        where = Path(str(item.path)).resolve().relative_to(root).as_posix()
        group = "deployment" if where in DEPLOYMENT_GROUP else "main"
        item.add_marker(pytest.mark.xdist_group(group))


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
def site_records(
    caplog: pytest.LogCaptureFixture,
) -> Iterator[pytest.LogCaptureFixture]:
    """What the site's own log (``kidneyfl.*``) records at INFO and above,
    whatever an earlier test or ``common.logs`` left on those loggers (their
    level, their handlers, ``propagate`` off): the test's outcome never depends
    on which tests ran before it in the same worker."""
    logger = logging.getLogger("kidneyfl")
    caplog.set_level(logging.INFO, logger="kidneyfl")  # restored after the test
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's task identity, which messages built outside a running ServerApp
    need; modules that build messages request it with
    ``pytestmark = pytest.mark.usefixtures("task_identity")``."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    yield
