"""``kidneyfl pretrain`` and the plan key ``initial-checkpoint`` (issue 19)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cli.pretrain import pretrain
from common.config import load_site_config
from common.models import build_model
from server.checkpoint import CheckpointError, load_checkpoint, load_initial
from sim.phantoms.sites import write_site_phantom
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


def test_pretrain_writes_the_phantom_stand_in_with_its_overrides(tmp_path):
    """The demo's public set is a phantom section: pretraining writes its cases
    first, with the section's profile overrides (large tumours)."""
    path = write_site_yaml(
        tmp_path, "public", cases=3, privacy={"enabled": False}, generate=False
    )
    doc = yaml.safe_load(path.read_text())
    doc["phantom"]["overrides"] = {"tumour_median_diameter_mm": 55.0, "noise_hu": 7.0}
    path.write_text(yaml.safe_dump(doc))
    pretrain(path, tmp_path / "pre", dataset="d", licence="l", steps=1, overrides=TINY)
    written = json.loads((tmp_path / "data" / "public" / "phantom.json").read_text())
    assert written["profile"]["tumour_median_diameter_mm"] == 55.0
    assert written["profile"]["noise_hu"] == 7.0


def test_phantom_overrides_name_the_site_and_the_field(tmp_path):
    path = write_site_yaml(tmp_path, "demo", cases=2, generate=False)
    doc = yaml.safe_load(path.read_text())
    doc["phantom"]["overrides"] = {"tumour_size_mm": 55.0}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"site demo: phantom.overrides: tumour_size"):
        write_site_phantom(load_site_config(path))
    assert not (tmp_path / "data" / "demo").exists()  # nothing half-written
    doc["phantom"].update(task="classification", overrides={"noise_hu": 1.0})
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="remove it for task: classification"):
        load_site_config(path)
