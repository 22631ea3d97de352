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
