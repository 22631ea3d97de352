"""A site trains with the learning rate the coordinator sends for the round
(``lr-schedule``), else the plan's; a rate that makes no sense is refused before
any privacy budget is spent."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from client import app as site_app
from common import packing, wire
from common.config import load_site_config
from common.models import build_model
from tests.fakes import TINY_PLAN, site_context, site_message, write_site_yaml

pytestmark = pytest.mark.usefixtures("task_identity")

PLAN = {
    **TINY_PLAN,
    "model": "unet-tiny",
    "num-server-rounds": 1,
    "local-epochs": 1,
    "learning-rate": 0.01,
}


def _train(yaml_path, plan: dict, rate: float | str | None = None):
    """One train round at the site from a fixed global model; the reply."""
    torch.manual_seed(0)
    msg = site_message("train", ArrayRecord(build_model("unet-tiny").state_dict()), 1)
    if rate is not None:
        msg.content[wire.CONFIG][wire.LEARNING_RATE] = rate
    return site_app.train(msg, site_context(yaml_path, plan))


def _update(reply) -> dict[str, torch.Tensor]:
    assert reply.content[wire.METRICS][wire.REFUSED] == 0
    return packing.unpack_arrays(reply.content[wire.ARRAYS]).to_torch_state_dict()


def test_site_trains_with_the_sent_rate_as_if_the_plan_had_it(tmp_path):
    # DP off: the local training is then deterministic, so updates compare
    # exactly; a site that ignored the sent rate would train with the plan's 0.01.
    site = write_site_yaml(tmp_path, "a", cases=5, privacy={"enabled": False})
    sent = _update(_train(site, PLAN, rate=0.002))
    planned = _update(_train(site, {**PLAN, "learning-rate": 0.002}))
    assert all(torch.equal(sent[k], planned[k]) for k in sent)


@pytest.mark.parametrize("bad", [0.0, -0.01, float("nan"), 50.0, "fast"])
def test_a_senseless_rate_is_refused_before_any_spend(tmp_path, bad):
    site = write_site_yaml(tmp_path, "a", cases=5)
    reply = _train(site, {**PLAN, "dp-target-epsilon": 20.0}, rate=bad)
    metrics = reply.content[wire.METRICS]
    assert metrics[wire.REFUSED] == 1
    assert reply.content[wire.SITE][wire.REFUSAL_CODE] == "request-invalid"
    ledger = load_site_config(site).state_dir / "privacy-ledger.json"
    assert not ledger.exists()  # nothing spent
