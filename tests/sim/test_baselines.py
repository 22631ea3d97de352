"""Local and pooled baselines (comparison.json) and the fine-tune round's record."""

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from cli.main import build_parser
from common import wire
from common.config import Plan
from common.task_models import build_plan_model
from server.finetune import collect_fine_tune, fine_tune_messages
from sim.baselines import run_baselines
from tests.fakes import TINY_PLAN, fake_arrays, fake_reply, write_site_yaml

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.mark.slow
def test_comparison_json_has_every_model_on_every_site(tmp_path):
    sites = [
        write_site_yaml(tmp_path, "a", cases=5, seed=1),
        write_site_yaml(
            tmp_path,
            "b",
            cases=4,
            seed=2,
            profile="thick-slice-noisy",
            privacy={"enabled": False},
        ),
    ]
    plan = Plan.model_validate(
        {
            **TINY_PLAN,
            "num-server-rounds": 1,
            "local-epochs": 1,
            "learning-rate": 0.003,
            "model": "unet-tiny",
        }
    )
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "plan.json").write_text(
        json.dumps(plan.model_dump(by_alias=True, mode="json"))
    )
    final = build_plan_model(plan).state_dict()
    path = run_baselines(sites, run_dir, final, ["local", "pooled"])

    comp = json.loads(path.read_text())
    assert set(comp) == {"metric", "models", "sites", "values"}
    assert comp["metric"] == "dice-kidney"
    assert comp["models"] == ["federated", "local-a", "local-b", "pooled"]
    assert comp["sites"] == ["a", "b"]
    for model in comp["models"]:
        for site in comp["sites"]:
            v = comp["values"][model][site]
            assert 0.0 <= v["dice-kidney"] <= 1.0 and "dice-tumour" in v
    budget = json.loads((run_dir / "baselines.json").read_text())["budget"]
    # validation_fraction 0.34: 3 and 2 training cases, batch 2, one epoch
    assert budget["local-a"]["steps"] == math.ceil(budget["local-a"]["cases"] / 2)
    assert budget["pooled"]["steps"] == (
        budget["local-a"]["steps"] + budget["local-b"]["steps"]
    )
    # baselines never spend a site's recorded budget
    assert not list(tmp_path.glob("state/*/privacy-ledger.json"))


def test_unknown_baseline_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="local,pooled"):
        run_baselines([], tmp_path, {}, ["central"])
    args = build_parser().parse_args(["simulate", "--baselines", "local,central"])
    with pytest.raises(ValueError, match="central"):
        args.func(args)


def _ft_reply(node, site, dice):
    return fake_reply(
        node,
        RecordDict(
            {
                wire.METRICS: MetricRecord(
                    {wire.dice_key("kidney"): dice, wire.FINE_TUNED: 1, wire.REFUSED: 0}
                ),
                wire.SITE: ConfigRecord({wire.SITE_NAME: site}),
            }
        ),
    )


def test_fine_tune_round_records_per_site_results():
    msgs = fine_tune_messages([1, 2], fake_arrays(0.5), {wire.FINE_TUNE_STEPS: 3})
    assert {m.metadata.message_type for m in msgs} == {"train.finetune"}
    assert msgs[0].content[wire.CONFIG][wire.FINE_TUNE_STEPS] == 3
    refusal = fake_reply(
        3,
        RecordDict(
            {
                wire.METRICS: MetricRecord({wire.REFUSED: 1}),
                wire.SITE: ConfigRecord(
                    {wire.SITE_NAME: "c", wire.REFUSAL_REASON: "over budget"}
                ),
            }
        ),
    )
    replies = [_ft_reply(1, "a", 0.7), _ft_reply(2, "b", 0.6), refusal]
    replies.append(fake_reply(4, error="node died"))

    def site_of(m):
        if m.has_error():
            return f"node-{m.metadata.src_node_id}"
        return str(m.content[wire.SITE][wire.SITE_NAME])

    out = collect_fine_tune(replies, site_of)
    assert out["sites"]["a"][wire.dice_key("kidney")] == pytest.approx(0.7)
    assert set(out["sites"]) == {"a", "b"}
    assert out["refused"] == {"c": "over budget"}
    assert "node died" in out["failed"]["node-4"]


def test_baselines_start_where_the_federation_started(tmp_path):
    """With ``initial-checkpoint``, local and pooled models start from the
    pretrained weights and train with the plan's recipe: with biases only,
    every other weight is still the pretrained one afterwards."""
    from cli.pretrain import pretrain
    from client.tasks.registry import get_task
    from common.config import load_site_config
    from sim.baselines import _train

    public = write_site_yaml(tmp_path, "public", cases=3, privacy={"enabled": False})
    pre = pretrain(
        public, tmp_path / "pre", dataset="d", licence="l", steps=1, overrides=TINY_PLAN
    )
    site = load_site_config(write_site_yaml(tmp_path, "a", cases=4, seed=3))
    plan = Plan.model_validate(
        TINY_PLAN | {"initial-checkpoint": str(pre), "trainable-parameters": "biases"}
    )
    data = get_task(plan.task).load_data(site, plan)
    model = _train(plan, data.train, data.n_train, 2, [site], seed=0)
    from server.checkpoint import load_checkpoint

    start, _ = load_checkpoint(pre)
    state = model.state_dict()
    frozen = [k for k in start if not k.endswith(".bias")]
    assert frozen and all(torch.equal(state[k], start[k]) for k in frozen)
    assert any(
        not torch.equal(state[k], start[k]) for k in start if k.endswith(".bias")
    )


def test_fedbn_baseline_uses_the_norm_layers_the_site_kept(tmp_path, tiny_site):
    """A site keeps its FedBN layers under the run id it accounts under (the
    run's name plus its schedule digest); the baselines' evaluation of a FedBN
    model must find them there, not evaluate the untrained global ones."""
    import torch

    from client.local_state import keep_norm_local
    from common.config import Plan, privacy_run_id
    from common.norm_layers import norm_keys
    from common.task_models import build_plan_model
    from sim.baselines import _federated

    plan = Plan.model_validate({"model": "unet-tiny-affine", "fedbn": True})
    run_dir = tmp_path / "runs" / "fedbn-run"
    model = build_plan_model(plan)
    state = model.state_dict()
    keys = norm_keys(model)
    assert keys
    trained = {k: (v + 1.0 if k in keys else v) for k, v in state.items()}
    keep_norm_local(trained, state, keys, tiny_site, privacy_run_id(run_dir.name, plan))
    model = _federated(plan, state, tiny_site, run_dir)
    got = model.state_dict()
    assert all(torch.equal(got[k], trained[k]) for k in keys)
