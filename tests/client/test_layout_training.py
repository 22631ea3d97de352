"""A site in another layout, with another label numbering, trains with the same
code and ends with exactly the same labels as the KiTS original."""

import json

import nibabel as nib
import numpy as np
import torch
import yaml

from client.tasks.segmentation.cases import load_site_cases
from client.tasks.segmentation.pipeline import volume_dataset
from client.tasks.segmentation.task import SegmentationTask
from client.train import local_train
from common.config import load_site_config
from tests.fakes import write_site_yaml

# nnU-Net dataset numbering differs from KiTS: cyst=2, tumour=3
TO_NNUNET = {0: 0, 1: 1, 2: 3, 3: 2}


def _as_nnunet(kits_root, out):
    ds = out / "Dataset042_Kidney"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for case in sorted(kits_root.glob("case_*")):
        img = nib.load(str(case / "imaging.nii.gz"))
        nib.save(img, str(ds / "imagesTr" / f"{case.name}_0000.nii.gz"))
        seg = nib.load(str(case / "segmentation.nii.gz"))
        lab = np.asanyarray(seg.dataobj)
        mapped = np.vectorize(TO_NNUNET.get)(lab).astype(np.uint8)
        nib.save(
            nib.Nifti1Image(mapped, seg.affine),
            str(ds / "labelsTr" / f"{case.name}.nii.gz"),
        )
    (ds / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "kidney": 1, "renal cyst": 2, "tumor": 3},
                "file_ending": ".nii.gz",
                "numTraining": 5,
            }
        )
    )
    return ds


def test_nnunet_site_trains_and_labels_match_kits(tmp_path, tiny_plan):
    kits_yaml = write_site_yaml(tmp_path, "kits", cases=5)
    kits = load_site_config(kits_yaml)
    ds = _as_nnunet(kits.data.root, tmp_path / "nnunet")
    doc = yaml.safe_load(kits_yaml.read_text())
    doc.update(name="nnunet", state_dir=str(tmp_path / "state-nn"))
    doc["data"] = {
        "root": str(ds),
        "layout": "auto",
        "validation_fraction": 0.34,
        "label_names": {"renal cyst": "cyst"},
    }
    nn_yaml = tmp_path / "nn.yaml"
    nn_yaml.write_text(yaml.safe_dump(doc))
    nn = load_site_config(nn_yaml)

    a, b = load_site_cases(kits), load_site_cases(nn)
    assert b.label_map == {0: 0, 1: 1, 2: 3, 3: 2}
    assert [c.case_id for c in a.validation] == [c.case_id for c in b.validation]
    va = volume_dataset(a.validation, kits, tiny_plan, a.label_map)
    vb = volume_dataset(b.validation, nn, tiny_plan, b.label_map)
    for i in range(len(va)):
        assert torch.equal(va[i]["label"], vb[i]["label"])
        assert torch.allclose(va[i]["image"], vb[i]["image"])

    task = SegmentationTask()
    data = task.load_data(nn, tiny_plan)
    from common.task_models import build_plan_model

    model = build_plan_model(tiny_plan)
    stats = local_train(
        model,
        data.train,
        task.loss(tiny_plan),
        epochs=1,
        batch_size=2,
        learning_rate=0.01,
        optimizer="adam",
        device=torch.device("cpu"),
        seed=0,
    )
    assert stats.steps >= 1 and np.isfinite(stats.loss)
    out = task.evaluate(model, data, tiny_plan, torch.device("cpu"))
    assert 0.0 <= out["dice-kidney"] <= 1.0
