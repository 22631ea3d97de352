"""End to end: a Flower simulation of two classification hospitals with DP, the
same ClientApp, ServerApp, ledger and checkpoints as segmentation (slow)."""

import json

import pytest
import torch

from client.data.class_layouts import discover_classes
from client.tasks.base import TaskData
from client.tasks.classification.data import build_dataset
from client.tasks.registry import get_task
from common import wire
from common.config import load_plan, load_site_config
from common.task_models import build_plan_model
from common.weights import import_state
from server.checkpoint import load_checkpoint
from sim.phantoms.sites import write_site_phantom
from sim.runner import simulate
from tests.fakes import write_cls_yaml

PLAN = {
    "task": "classification",
    "model": "resnet-tiny",
    "hu-window": "-100,400",
    "image-size": 32,
    "batch-size": 32,
    "local-epochs": 15,
    "learning-rate": 0.005,
    "dp-target-epsilon": 100.0,
    "min-sites": 2,
    "num-server-rounds": 3,
}
# DP noise and sampling come from each site's own entropy (issue 17), so a run
# cannot be repeated draw for draw: the margin comes from repeated runs. Three
# runs of exactly this test on 2 shared CPU cores gave held-out balanced
# accuracy 0.344, 0.375 and 0.394 on 160 cases (chance 0.25; the standard error
# of one 160-case estimate is about 0.035). At epsilon 50 and 2 rounds the same
# test gave 0.275-0.40: too close to chance for a test that must not flake.
MARGIN = 0.06


@pytest.mark.slow
def test_classification_federation_with_dp_beats_chance(tmp_path):
    sites = [
        write_cls_yaml(tmp_path, "site-a", cases=200, profile="thin-slice-cm", seed=1),
        write_cls_yaml(
            tmp_path,
            "site-b",
            cases=200,
            profile="standard-nephro",
            mix={"normal": 1, "cyst": 1, "tumour": 1, "stone": 3},  # a stone clinic
            seed=2,
        ),
    ]
    run = simulate(
        sites,
        "cls",
        overrides=PLAN,
        out_dir=tmp_path / "runs",
        flwr_home=tmp_path / "flwr-home",
        stream=True,
    )
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["round"] for e in lines] == [1, 2, 3]
    for e in lines:
        assert set(e["train"]) == {"site-a", "site-b"} and e["aggregated"]
        assert not e["refused"] and not e["failed"] and not e["rejected"]
        for m in e["evaluate"].values():  # per-site metrics, confusion counts
            assert 0 <= m[wire.BALANCED_ACCURACY] <= 1
            assert (
                sum(v for k, v in m.items() if k.startswith("cm-"))
                == m[wire.NUM_VAL_CASES]
            )
    eps = [e["epsilon"]["site-a"] for e in lines]
    assert 0 < eps[0] < eps[1] <= 100.0 * 1.01  # DP on, cumulative, within target

    # The final global model on 160 new phantoms (balanced classes, new seeds).
    held = load_site_config(
        write_cls_yaml(
            tmp_path, "held-out", cases=160, profile="standard-nephro", seed=9
        )
    )
    write_site_phantom(held)
    plan = load_plan(PLAN)
    task = get_task("classification")
    every = build_dataset(discover_classes(held, plan), plan)  # all 160 slices held out
    data = TaskData(every, every, len(every), len(every), "held-out")
    state, meta = load_checkpoint(run / "final")
    assert meta["round"] == 3
    model = build_plan_model(plan)
    import_state(model, state)
    m = task.evaluate(model, data, plan, torch.device("cpu"))
    last = lines[-1]["weighted"][wire.BALANCED_ACCURACY]
    assert m[wire.BALANCED_ACCURACY] > 0.25 + MARGIN, (m, last)
