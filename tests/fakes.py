"""Test doubles and builders shared by the test modules.

Site YAMLs with tiny phantom data (segmentation and classification), Flower
messages and replies built without a running federation, a coordinator's
strategy wrapper over a fake grid, and a fake run directory for reports.
Fixtures live in ``tests/conftest.py``; plain helpers live here, so no test
module imports another.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata

from common import wire
from common.config import Plan
from server.reporting.metrics_log import append_metrics, round_entry
from server.reporting.round_record import RoundRecord
from server.strategy.aggregators import build_strategy, strategy_options
from server.strategy.wrapper import SiteAwareStrategy
from sim.phantoms.kits_writer import write_site
from sim.phantoms.profiles import load_profile

TINY_SCALE = 5.0  # coarse voxels: a case is a few thousand voxels
# the plan keys that make a segmentation round small enough for a test
TINY_PLAN = {"spacing-mm": "6,6,8", "patch-size": "32,32,16", "batch-size": 2}
DEFAULT_PRIVACY = {"enabled": True, "max_epsilon": 100.0, "delta": 1e-3}

# -- site YAMLs ---------------------------------------------------------------------


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
        "privacy": {"min_cases_for_aggregates": 1} | (privacy or DEFAULT_PRIVACY),
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


def cls_plan(**kw: object) -> Plan:
    """A classification plan sized for tests (32-pixel slices, ``resnet-tiny``)."""
    return Plan.model_validate(
        {
            "task": "classification",
            "model": "resnet-tiny",
            "hu-window": "-100,400",
            "image-size": 32,
            # the training the tests were written for (the plan schema's
            # defaults before they became the demo's, issue 18)
            "num-server-rounds": 4,
            "local-epochs": 1,
            "batch-size": 4,
            "learning-rate": 0.003,
            **kw,
        }
    )


def write_cls_yaml(
    tmp: Path,
    name: str,
    cases: int = 24,
    profile: str = "standard-nephro",
    mix: dict | None = None,
    seed: int = 1,
    privacy: dict | None = None,
) -> Path:
    """A classification site YAML whose phantom section writes the slices."""
    doc = {
        "name": name,
        "data": {"root": str(tmp / "data" / name), "validation_fraction": 0.25},
        "device": "cpu",
        "state_dir": str(tmp / "state" / name),
        "privacy": privacy or DEFAULT_PRIVACY,
        "phantom": {
            "task": "classification",
            "profile": profile,
            "cases": cases,
            "seed": seed,
            **({"class_mix": mix} if mix else {}),
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# -- messages as a site receives them -------------------------------------------------


def site_message(
    kind: str, arrays: ArrayRecord, rnd: int, **config: int | float | str
) -> Message:
    """A ``kind`` message of global round ``rnd`` from the coordinator to node 1.

    ``config`` adds (or replaces) config record keys, e.g.
    ``**{wire.FINE_TUNE_STEPS: 2}`` for a fine-tune request.
    """
    config = ConfigRecord(
        {wire.RUN_ID: "run-x", wire.GLOBAL_ROUND: rnd, wire.TOTAL_ROUNDS: 1, **config}
    )
    content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config})
    return site_request(kind, content, f"m-{kind}-{rnd}")


def site_request(kind: str, content: RecordDict, message_id: str) -> Message:
    """A ``kind`` message to node 1 carrying exactly ``content``."""
    meta = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600,
        message_type=kind,
    )
    return make_message(meta, content=content)


def site_context(yaml_path: Path, plan: dict) -> SimpleNamespace:
    """The parts of a Flower ``Context`` the ClientApp handlers read."""
    return SimpleNamespace(
        run_config=plan, node_config={"site-config": str(yaml_path)}, run_id=1
    )


# -- replies as the coordinator receives them -----------------------------------------


def fake_reply(
    node: int, content: RecordDict | None = None, error: str | None = None
) -> Message:
    """A train reply from ``node``: ``content``, or an error reply with ``error``."""
    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )
    if error:
        return make_message(meta, error=Error(code=0, reason=error))
    return make_message(meta, content=content)


def fake_arrays(
    w: float, shape: tuple[int, ...] = (2, 2), dtype: type = np.float32
) -> ArrayRecord:
    """A two-array model, ``w`` (of ``shape`` and ``dtype``) and ``b``, all ``w``."""
    return ArrayRecord(
        {
            "w": Array(np.full(shape, w, dtype=dtype)),
            "b": Array(np.array([w], dtype=np.float32)),
        }
    )


def train_reply(
    node: int, site: str, w: float | ArrayRecord, n: float, **arrays_kw: object
) -> Message:
    """An accepted DP train reply of ``site`` with ``n`` cases and weights ``w``."""
    arrays = fake_arrays(w, **arrays_kw) if not isinstance(w, ArrayRecord) else w
    return fake_reply(
        node,
        RecordDict(
            {
                wire.ARRAYS: arrays,
                wire.METRICS: MetricRecord(
                    {
                        wire.NUM_EXAMPLES: n,
                        wire.TRAIN_LOSS: 1.0,
                        wire.REFUSED: 0,
                        wire.EPSILON: 1.0,
                        wire.DP_ENABLED: 1,
                    }
                ),
                wire.SITE: ConfigRecord({wire.SITE_NAME: site}),
            }
        ),
    )


class FiveNodeGrid:
    """A grid whose five nodes are always online."""

    def get_node_ids(self) -> list[int]:
        """Node ids 1 to 5."""
        return [1, 2, 3, 4, 5]


# -- the coordinator's wrapper -------------------------------------------------------


def wrap_strategy(
    name: str = "fedavg",
    min_sites: int = 1,
    norm_factor: float = 0.0,
    offset: int = 0,
    **plan_keys: object,
) -> SiteAwareStrategy:
    """The coordinator's wrapper around plan strategy ``name``, as the server builds
    it from a plan with ``plan_keys``; rounds end without a record."""
    plan = Plan.model_validate({"strategy": name, "min-sites": min_sites, **plan_keys})
    inner = build_strategy(plan.strategy, plan.min_sites, 1.0, **strategy_options(plan))
    return SiteAwareStrategy(
        inner,
        min_sites=plan.min_sites,
        round_offset=offset,
        base_config={},
        on_round_end=lambda rec, arrays: None,
        norm_factor=norm_factor,
    )


def forbid_flower_mean(monkeypatch: pytest.MonkeyPatch, s: SiteAwareStrategy) -> None:
    """Fail the test if the wrapper hands the replies to Flower's own mean."""

    def fail(*_: object) -> None:
        raise AssertionError("FedAvg's mean went through Flower")

    monkeypatch.setattr(s.inner, "aggregate_train", fail)


# -- a run directory for reports -----------------------------------------------------

RUN_SITES = ("hospital-a", "hospital-b")


def round_record(rnd: int, dp: bool = True, cm: bool = False) -> RoundRecord:
    """Round ``rnd`` of two sites whose scores grow with the round (and a refusal);
    ``cm`` adds 2-class confusion counts, ``dp`` False spends no epsilon."""
    rec = RoundRecord(round=rnd, aggregated=True)
    for i, site in enumerate(RUN_SITES):
        score = 0.2 * rnd + 0.1 * i
        ev = {
            "dice-kidney": score,
            "dice-masses": score / 2,
            "dice-tumour": score / 3,
            "surface-dice-kidney": score / 1.5,
            "eval-loss": 1.0 / rnd,
            "num-val-cases": 2.0 + i,
            "num-examples": 6.0,
        }
        if cm:  # 2 classes: true i, predicted j
            ev.update({"cm-0-0": 5.0, "cm-0-1": 1.0 + i, "cm-1-0": 2.0, "cm-1-1": 4.0})
        rec.evaluate[site] = ev
        rec.train[site] = {
            "train-loss": 2.0 / rnd + i,
            "epsilon": 1.5 * rnd if dp else float("inf"),
            "delta": 1e-3,
            "dp-enabled": float(dp),
            "num-examples": 6.0,
        }
    rec.refused["hospital-c"] = "site hospital-c: epsilon 8 would pass its ceiling 5"
    return rec


def write_run(tmp: Path, rounds: int = 3, **kw: bool) -> Path:
    """A run directory ``tmp/run`` with ``rounds`` of :func:`round_record` and a
    plan; ``kw`` goes to :func:`round_record`."""
    run = tmp / "run"
    for r in range(1, rounds + 1):
        append_metrics(run, round_entry(round_record(r, **kw)))
    plan = Plan().model_dump(by_alias=True, mode="json")
    plan["class-names"] = ["benign", "malignant"]  # the classification task's key
    (run / "plan.json").write_text(json.dumps(plan))
    return run


# -- hostile sites (issue 32) ---------------------------------------------------------


def eval_reply(node: int, site: str, metrics: dict, **site_keys: str) -> Message:
    """An evaluate reply of ``site`` carrying ``metrics`` (and ``site_keys`` in
    its site record, e.g. a refusal's code and reason)."""
    return fake_reply(
        node,
        RecordDict(
            {
                wire.METRICS: MetricRecord(metrics),
                wire.SITE: ConfigRecord({wire.SITE_NAME: site, **site_keys}),
            }
        ),
    )


def raw_reply(node: int, records: dict[str, object]) -> Message:
    """A reply from ``node`` holding exactly ``records``, unchecked: any value,
    a record or not, as a hostile site's own code could put on the wire.

    Flower's ``RecordDict`` refuses what is not a record; this fills its
    storage directly, so the coordinator's own checks are what is tested.
    """
    content = RecordDict({})
    content._data.update(records)  # noqa: SLF001 - what a hostile site can send
    return fake_reply(node, content)


class NodeGrid:
    """A grid of the given nodes, each answering with its reply given in
    advance (``replies``: node -> reply; a node without one stays silent)."""

    def __init__(self, nodes: list[int], replies: dict | None = None) -> None:
        self.nodes = list(nodes)
        self.replies = dict(replies or {})

    def get_node_ids(self) -> list[int]:
        """The grid's node ids."""
        return list(self.nodes)

    def send_and_receive(
        self, messages: list[Message], timeout: float | None = None
    ) -> list[Message]:
        """The prepared reply of every node a message goes to."""
        dst = [m.metadata.dst_node_id for m in messages]
        return [self.replies[n] for n in dst if n in self.replies]


def assert_each_case_own_gradient(
    model: torch.nn.Module,
    alone: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    atol: float = 1e-7,
) -> None:
    """Opacus' ``grad_sample`` of every parameter of ``model`` (after a
    backward pass over the batch) equals the gradient of ``loss`` for each case
    alone, computed on ``alone`` (an untouched copy of the model)."""
    for i in range(len(x)):
        alone.zero_grad()
        loss(alone(x[i : i + 1]), y[i : i + 1]).backward()
        for (pname, p), q in zip(
            model.named_parameters(), alone.parameters(), strict=True
        ):
            diff = (p.grad_sample[i] - q.grad).norm()
            assert diff <= 1e-4 * q.grad.norm() + atol, (pname, i)
