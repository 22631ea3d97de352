from collections import OrderedDict

import pytest
import torch

from server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from server.report import append_metrics, read_metrics


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
