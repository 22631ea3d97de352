from collections import OrderedDict

import pytest
import torch

from server.checkpoint import (
    CheckpointError,
    load_checkpoint,
    max_epsilon_spent,
    save_checkpoint,
)
from server.reporting.metrics_log import append_metrics, read_metrics


def _state(v: float) -> OrderedDict:
    return OrderedDict(w=torch.full((2, 3), v), n=torch.tensor([1]))


def test_round_trip_and_latest_wins(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1.0), {"plan_fingerprint": {"m": "x"}})
    save_checkpoint(tmp_path, 2, _state(2.0), {"plan_fingerprint": {"m": "x"}})
    state, meta = load_checkpoint(tmp_path, {"m": "x"})
    assert meta["round"] == 2 and torch.equal(state["w"], torch.full((2, 3), 2.0))
    assert (tmp_path / "round-0001.pt").exists()  # earlier rounds are kept


def test_damaged_weights_and_other_plan_are_refused(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1.0), {"plan_fingerprint": {"m": "x"}})
    with pytest.raises(CheckpointError, match="resume with the same plan"):
        load_checkpoint(tmp_path, {"m": "y"})
    weights = tmp_path / "round-0001.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def test_metrics_lines_survive_a_torn_write(tmp_path):
    append_metrics(tmp_path, {"round": 1})
    append_metrics(tmp_path, {"round": 2})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "trunc')  # a crash mid-write
    assert [e["round"] for e in read_metrics(tmp_path)] == [1, 2]


def _plan(**overrides):
    from common.config import load_plan
    from sim.runner import default_plan

    return load_plan({**default_plan(), **overrides})


def test_strategy_options_and_fedbn_must_match_to_resume(tmp_path):
    adam = _plan(strategy="fedadam", **{"server-learning-rate": 0.05})
    save_checkpoint(tmp_path, 1, _state(1.0), {"plan_fingerprint": adam.fingerprint()})
    load_checkpoint(tmp_path, adam.fingerprint())  # the same plan resumes
    other = _plan(strategy="fedadam", **{"server-learning-rate": 0.1})
    with pytest.raises(CheckpointError, match=r"server_learning_rate: 0\.05 -> 0\.1"):
        load_checkpoint(tmp_path, other.fingerprint())
    fedbn = _plan(strategy="fedadam", fedbn=True, model="unet-tiny-affine")
    with pytest.raises(CheckpointError, match="fedbn: False -> True"):
        load_checkpoint(tmp_path, fedbn.fingerprint())


def test_rounds_timeouts_and_privacy_target_may_change_on_resume():
    a = _plan()
    b = _plan(
        **{"num-server-rounds": 12, "round-timeout": 60.0, "dp-target-epsilon": 4.0}
    )
    assert a.fingerprint() == b.fingerprint()


def test_checkpoint_from_before_the_strategy_keys_resumes_under_their_defaults(
    tmp_path,
):
    from common.config import RESUME_STRATEGY_KEYS

    plan = _plan()
    old = {k: v for k, v in plan.fingerprint().items() if k not in RESUME_STRATEGY_KEYS}
    save_checkpoint(tmp_path, 3, _state(3.0), {"plan_fingerprint": old})
    _, meta = load_checkpoint(tmp_path, plan.fingerprint())
    assert meta["round"] == 3
    with pytest.raises(CheckpointError, match="proximal_mu: 0.0 -> 0.01"):
        load_checkpoint(
            tmp_path,
            _plan(strategy="fedprox", **{"proximal-mu": 0.01}).fingerprint(),
        )


def test_max_epsilon_spent_reads_old_and_new_sidecars(tmp_path):
    # Before issue 18 the sidecar called the largest epsilon spent
    # "max_epsilon", the site YAML's name for a ceiling; old runs still read.
    save_checkpoint(tmp_path / "old", 1, _state(1.0), {"max_epsilon": 3.5})
    save_checkpoint(tmp_path / "new", 1, _state(1.0), {"max_epsilon_spent": 2.5})
    save_checkpoint(tmp_path / "off", 1, _state(1.0), {"max_epsilon_spent": None})
    assert max_epsilon_spent(load_checkpoint(tmp_path / "old")[1]) == 3.5
    assert max_epsilon_spent(load_checkpoint(tmp_path / "new")[1]) == 2.5
    assert max_epsilon_spent(load_checkpoint(tmp_path / "off")[1]) is None


def test_a_run_with_checkpoints_resumes_only_when_asked(tmp_path):
    from common.config import Plan
    from common.task_models import build_plan_model
    from server.run_start import start_point

    plan = Plan(model="unet-tiny", seed=3)
    fresh = start_point(plan, tmp_path)  # nothing there: the seeded model
    assert fresh.done == 0 and fresh.origin is None
    ref = build_plan_model(plan).state_dict()
    assert all(torch.equal(fresh.state[k], ref[k]) for k in ref)
    saved = {k: v + 1 for k, v in ref.items()}
    meta = {"plan_fingerprint": plan.fingerprint()}
    save_checkpoint(tmp_path / "checkpoints", 2, saved, meta)
    with pytest.raises(CheckpointError, match="resume=true"):
        start_point(plan, tmp_path)  # never overwrites a run by accident
    resumed = start_point(plan.model_copy(update={"resume": True}), tmp_path)
    assert resumed.done == 2
    assert all(torch.equal(resumed.state[k], saved[k]) for k in saved)


def test_round_end_checkpoints_the_round_and_names_the_epsilon_spent(tmp_path):
    import json
    from types import SimpleNamespace

    from common.config import Plan
    from server.reporting.round_record import RoundRecord
    from server.reporting.status import RunStatus
    from server.round_end import RoundEnd, RunMeta

    rec = RoundRecord(round=1, aggregated=True)
    for site, eps in (("a", 1.5), ("b", 2.5)):
        rec.train[site] = {"num-examples": 4.0, "epsilon": eps, "dp-enabled": 1.0}
        rec.evaluate[site] = {"dice-kidney": 0.5, "num-val-cases": 2.0}
    requested = []
    end = RoundEnd(
        tmp_path,
        RunMeta(Plan(), {"source": "plan"}),
        RunStatus(tmp_path, 3),
        SimpleNamespace(request=lambda: requested.append(1)),
        server_state=dict,
    )
    end(rec, SimpleNamespace(to_torch_state_dict=lambda: _state(1.0)))
    state, side = load_checkpoint(tmp_path / "checkpoints", Plan().fingerprint())
    assert torch.equal(state["w"], _state(1.0)["w"]) and side["round"] == 1
    assert side["max_epsilon_spent"] == 2.5 and "max_epsilon" not in side
    assert side["sites"] == ["a", "b"] and side["preprocessing"] == {"source": "plan"}
    assert [e["round"] for e in read_metrics(tmp_path)] == [1] and requested
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["rounds_done"] == 1
