"""``kidneyfl pretrain`` and the plan key ``initial-checkpoint`` (issue 19)."""

from __future__ import annotations

import json

import pytest
import torch

from cli.pretrain import pretrain
from common.models import build_model
from server.checkpoint import CheckpointError, load_checkpoint, load_initial
from tests.fakes import TINY_PLAN, write_site_yaml

TINY = dict(TINY_PLAN)


def _public(tmp_path):
    return write_site_yaml(
        tmp_path, "public", cases=4, seed=5, privacy={"enabled": False}
    )


def test_pretrain_writes_a_checkpoint_that_names_its_data(tmp_path):
    out = pretrain(
        _public(tmp_path),
        tmp_path / "pre",
        dataset="phantoms seed 5",
        licence="CC0",
        steps=2,
        overrides=TINY,
    )
    state, meta = load_checkpoint(out)  # checksum verified
    assert meta["pretrained"]["dataset"] == "phantoms seed 5"
    assert meta["pretrained"]["licence"] == "CC0" and meta["pretrained"]["steps"] == 2
    assert meta["model"] == "unet-tiny" and not meta["pretrained"]["dp"]
    fresh = build_model("unet-tiny").state_dict()
    assert set(state) == set(fresh)
    assert any(not torch.equal(state[k], fresh[k]) for k in fresh)  # it trained
    weights, info = load_initial(out, "segmentation", "unet-tiny")
    assert info["sha256"] == meta["sha256"] and info["licence"] == "CC0"
    assert json.loads((out / "latest.json").read_text())["round"] == 0
    # nothing is overwritten
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        pretrain(_public(tmp_path), out, dataset="x", licence="y", steps=1)


def test_pretrain_refuses_a_dp_site_and_the_wrong_model(tmp_path):
    hospital = write_site_yaml(tmp_path, "hospital", cases=4, generate=False)
    with pytest.raises(ValueError, match="privacy.enabled: false"):
        pretrain(hospital, tmp_path / "p", dataset="x", licence="y", steps=1)
    out = pretrain(
        _public(tmp_path),
        tmp_path / "pre",
        dataset="d",
        licence="l",
        steps=1,
        overrides=TINY,
    )
    with pytest.raises(CheckpointError, match="model unet-tiny, the plan is"):
        load_initial(out, "segmentation", "unet-small")
    (out / "round-0000.pt").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="checksum"):
        load_initial(out, "segmentation", "unet-tiny")
