"""The site's ClientApp functions for FedBN and the fine-tune round, called
directly (no federation): what leaves the site and what stays."""

import json
import time
from types import SimpleNamespace

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata

from client import app as site_app
from client.local_state import personal_dir
from common import wire
from common.config import load_site_config
from common.models import build_model
from common.norm_layers import norm_keys
from tests.conftest import write_site_yaml
from tests.server.test_strategy import _task_identity  # noqa: F401

PLAN = {
    "spacing-mm": "6,6,8",
    "patch-size": "32,32,16",
    "batch-size": 2,
    "model": "unet-tiny-affine",
    "fedbn": True,
    "fine-tune-steps": 2,
    "num-server-rounds": 1,
    "local-epochs": 1,
    "dp-target-epsilon": 20.0,
}


def _msg(kind: str, arrays: ArrayRecord, rnd: int) -> object:
    meta = Metadata(
        run_id=1,
        message_id=f"m-{kind}-{rnd}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600,
        message_type=kind,
    )
    config = ConfigRecord(
        {wire.RUN_ID: "run-x", wire.GLOBAL_ROUND: rnd, wire.TOTAL_ROUNDS: 1}
    )
    return make_message(
        meta, content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config})
    )


def test_fedbn_round_then_fine_tune_at_the_site(tmp_path):
    yaml_path = write_site_yaml(tmp_path, "a", cases=5)
    site = load_site_config(yaml_path)
    ctx = SimpleNamespace(
        run_config=PLAN, node_config={"site-config": str(yaml_path)}, run_id=1
    )
    model = build_model("unet-tiny-affine")
    keys = norm_keys(model)
    glob = {k: v.clone() for k, v in model.state_dict().items()}

    reply = site_app.train(_msg("train", ArrayRecord(model.state_dict()), 1), ctx)
    assert reply.content[wire.METRICS][wire.REFUSED] == 0
    sent = wire.unpack_arrays(reply.content[wire.ARRAYS]).to_torch_state_dict()
    local = torch.load(personal_dir(site, "run-x") / "norm.pt", weights_only=True)
    for k in keys:  # the norm layers trained, stayed home, and did not travel
        assert torch.equal(sent[k], glob[k])
        assert set(local) == set(keys)
    assert any(not torch.equal(local[k], glob[k]) for k in keys)
    other = next(k for k in glob if k not in keys)
    assert not torch.equal(sent[other], glob[other])

    # fine-tune the "final" model: metrics come back, the model stays
    final = ArrayRecord(dict(sent))
    ft = site_app.fine_tune(_msg("train.finetune", final, 2), ctx)
    assert wire.ARRAYS not in ft.content.array_records
    metrics = ft.content[wire.METRICS]
    assert metrics[wire.FINE_TUNED] == 1 and wire.dice_key("kidney") in metrics
    assert (personal_dir(site, "run-x") / "fine-tuned.pt").exists()
    ledger = json.loads((site.state_dir / "privacy-ledger.json").read_text())
    assert [e["steps"] for e in ledger["entries"]][-1] == 2  # accounted
    # the run's noise was calibrated for its epochs *and* the fine-tune steps
    assert metrics[wire.EPSILON] <= 20.0 * 1.01
