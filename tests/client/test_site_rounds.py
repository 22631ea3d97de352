"""The site's ClientApp functions for FedBN and the fine-tune round, called
directly (no federation): what leaves the site and what stays."""

import json

import pytest
import torch
from flwr.app import ArrayRecord

from client import app as site_app
from client.local_state import personal_dir
from common import packing, wire
from common.config import load_site_config
from common.models import build_model
from common.norm_layers import norm_keys
from tests.fakes import TINY_PLAN, site_context, site_message, write_site_yaml

pytestmark = pytest.mark.usefixtures("task_identity")

PLAN = {
    **TINY_PLAN,
    "model": "unet-tiny-affine",
    "fedbn": True,
    "fine-tune-steps": 2,
    "num-server-rounds": 1,
    "local-epochs": 1,
    "learning-rate": 0.003,
    "dp-target-epsilon": 20.0,
}


def test_fedbn_round_then_fine_tune_at_the_site(tmp_path):
    yaml_path = write_site_yaml(tmp_path, "a", cases=5)
    site = load_site_config(yaml_path)
    ctx = site_context(yaml_path, PLAN)
    model = build_model("unet-tiny-affine")
    keys = norm_keys(model)
    glob = {k: v.clone() for k, v in model.state_dict().items()}

    reply = site_app.train(
        site_message("train", ArrayRecord(model.state_dict()), 1), ctx
    )
    assert reply.content[wire.METRICS][wire.REFUSED] == 0
    sent = packing.unpack_arrays(reply.content[wire.ARRAYS]).to_torch_state_dict()
    local = torch.load(personal_dir(site, "run-x") / "norm.pt", weights_only=True)
    for k in keys:  # the norm layers trained, stayed home, and did not travel
        assert torch.equal(sent[k], glob[k])
        assert set(local) == set(keys)
    assert any(not torch.equal(local[k], glob[k]) for k in keys)
    other = next(k for k in glob if k not in keys)
    assert not torch.equal(sent[other], glob[other])

    # fine-tune the "final" model: metrics come back, the model stays
    final = ArrayRecord(dict(sent))
    ft = site_app.fine_tune(
        site_message("train.finetune", final, 2, **{wire.FINE_TUNE_STEPS: 2}), ctx
    )
    assert wire.ARRAYS not in ft.content.array_records
    metrics = ft.content[wire.METRICS]
    assert metrics[wire.FINE_TUNED] == 1 and wire.dice_key("kidney") in metrics
    assert (personal_dir(site, "run-x") / "fine-tuned.pt").exists()
    ledger = json.loads((site.state_dir / "privacy-ledger.json").read_text())
    assert [e["steps"] for e in ledger["entries"]][-1] == 2  # accounted
    # the run's noise was calibrated for its epochs *and* the fine-tune steps
    assert metrics[wire.EPSILON] <= 20.0 * 1.01
