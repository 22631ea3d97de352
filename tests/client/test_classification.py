"""Classification task: manifest and folder parsing, phantoms, metrics, models
under Opacus, the task plug-in (issue 8)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from client.data.class_layouts import discover_classes, read_manifest
from client.data.errors import SiteDataError
from client.privacy.dpsgd import DPSpec
from client.tasks.classification.data import load_slice, split_cases
from client.tasks.registry import get_task
from client.train import local_train
from common import wire
from common.cls_metrics import (
    binary_auc,
    class_weights_from_counts,
    classification_metrics,
)
from common.config import ConfigError, Plan, load_plan, load_site_config
from common.models import MODELS, build_model
from common.task_models import build_plan_model
from sim.phantoms.profiles import PROFILES
from sim.phantoms.sites import write_site_phantom
from sim.phantoms.slices import (
    CLASSES,
    class_counts,
    generate_slice,
    write_cls_site,
)
from tests.fakes import cls_plan, write_cls_yaml

NAMES = ("normal", "cyst", "tumour", "stone")
CLS_MODELS = sorted(n for n, s in MODELS.items() if s.task == "classification")


# --- plan and site YAML -------------------------------------------------------


def test_plan_keys_parse_and_validate():
    plan = load_plan(
        {"task": "classification", "class-names": "a, b ,c", "class-weights": "1,2,3"}
    )
    assert plan.class_names == ("a", "b", "c") and plan.class_weights == (1, 2, 3)
    assert Plan().class_names == NAMES and Plan().class_balance == "loss"
    with pytest.raises(ConfigError, match="class-weights has 2 values"):
        load_plan({"class-weights": "1,2"})
    with pytest.raises(ConfigError, match="class-names"):
        load_plan({"class-names": "normal,normal"})
    with pytest.raises(ConfigError, match="class-balance"):
        load_plan({"class-balance": "oversample"})


def test_pyproject_lists_the_new_keys():
    from sim.runner import default_plan

    plan = load_plan(default_plan())  # Flower rejects keys missing there
    assert plan.class_names == NAMES and plan.image_size == 64


def test_site_yaml_phantom_block_is_validated(tmp_path):
    path = write_cls_yaml(tmp_path, "s", mix={"stone": -1})
    with pytest.raises(ConfigError, match="class_mix"):
        load_site_config(path)


# --- manifest and folders ----------------------------------------------------


def test_manifest_parsing_with_split_and_unlabelled(tmp_path):
    site = load_site_config(write_cls_yaml(tmp_path, "m", cases=8))
    write_site_phantom(site)
    root = site.data.root
    rows = (root / "manifest.csv").read_text().splitlines()
    images = [r.split(",")[0] for r in rows[1:]]
    (root / "manifest.csv").write_text(
        "image,label,split\n"
        f"{images[0]},stone,validation\n"
        f"{images[1]},normal,train\n"
        f"{images[2]},,\n"  # unlabelled: prediction only
        f"{images[3]},cyst,test\n" + "".join(f"{im},tumour,\n" for im in images[4:])
    )
    cases = read_manifest(root / "manifest.csv", NAMES)
    assert [c.label for c in cases[:4]] == [3, 0, None, 1]
    train, val = split_cases(cases, site)
    ids = {c.case_id for c in train}
    assert cases[1].case_id in ids and cases[0] in val
    assert cases[2] not in train + val and cases[3] not in train + val
    assert len(train) + len(val) == 6


@pytest.mark.parametrize(
    "body, match",
    [
        ("image,label\nimages/nope.nii.gz,stone\n", r"row 2: image .*nope.* not found"),
        ("image,label\n{img},kidney_stone\n", r"row 2: unknown class 'kidney_stone'"),
        ("file,class\n{img},stone\n", r"row 1: header"),
        ("image,label\n{img},stone,extra\n", r"row 2: 3 fields"),
        ("image,label,split\n{img},stone,holdout\n", r"row 2: unknown split"),
        ("image,label\n", r"lists no images"),
    ],
)
def test_manifest_errors_name_file_row_and_fix(tmp_path, body, match):
    root = tmp_path / "site"
    write_cls_site(root, PROFILES["standard-nephro"], 2, seed=0)
    manifest = root / "manifest.csv"
    manifest.write_text(body.format(img="images/case_00000.nii.gz"))
    with pytest.raises(SiteDataError, match=match) as err:
        read_manifest(manifest, NAMES)
    assert str(manifest) in str(err.value)


def test_missing_manifest_names_the_fix(tmp_path):
    with pytest.raises(SiteDataError, match="manifest not found"):
        read_manifest(tmp_path / "manifest.csv", NAMES)


def test_class_folders_and_their_errors(tmp_path):
    root = tmp_path / "folders"
    src = tmp_path / "src"
    write_cls_site(src, PROFILES["thin-slice-cm"], 4, seed=0)
    for cls in ("normal", "stone"):
        (root / cls).mkdir(parents=True)
    for i, cls in enumerate(("normal", "normal", "stone", "stone")):
        img = src / "images" / f"case_{i:05d}.nii.gz"
        (root / cls / img.name).write_bytes(img.read_bytes())
    path = tmp_path / "f.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "f",
                "data": {"root": str(root), "layout": "auto"},
                "state_dir": str(tmp_path / "st"),
                "privacy": {"enabled": False},
            }
        )
    )
    site = load_site_config(path)
    cases = discover_classes(site, cls_plan())
    assert sorted(c.label for c in cases) == [0, 0, 3, 3]
    (root / "cyst").mkdir()
    with pytest.raises(SiteDataError, match="cyst: class folder holds no"):
        discover_classes(site, cls_plan())
    (root / "cyst").rmdir()
    (root / "calculus").mkdir()
    with pytest.raises(SiteDataError, match="'calculus'.*rename"):
        discover_classes(site, cls_plan())


def test_segmentation_layout_is_refused_for_classification(tmp_path):
    path = write_cls_yaml(tmp_path, "k")
    doc = yaml.safe_load(path.read_text())
    doc["data"]["layout"] = "kits23"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SiteDataError, match="segmentation layout"):
        discover_classes(load_site_config(path), cls_plan())


def test_png_and_3d_nifti_slices_load(tmp_path):
    from PIL import Image

    png = tmp_path / "x.png"
    arr = np.zeros((40, 50), np.uint8)
    arr[10:20, 10:20] = 255
    Image.fromarray(arr).save(png)
    t = load_slice(png, cls_plan())
    assert t.shape == (1, 32, 32) and 0 <= t.min() and t.max() <= 1 and t.max() > 0.9

    import nibabel as nib

    vol = np.full((20, 20, 5), -1000, np.float32)
    vol[:, :, 2] = 400  # the middle slice, at the window's top
    nii = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), nii)
    assert torch.allclose(load_slice(nii, cls_plan()), torch.ones(1, 32, 32))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(SiteDataError, match="bad.nii.gz: cannot read"):
        load_slice(bad, cls_plan())


# --- phantoms ----------------------------------------------------------------


def test_class_counts_follow_a_skewed_mix_exactly():
    counts = class_counts(50, {"stone": 4, "normal": 1})
    assert counts == {"normal": 10, "cyst": 0, "tumour": 0, "stone": 40}
    assert sum(class_counts(7, None).values()) == 7
    assert (
        max(class_counts(7, None).values()) - min(class_counts(7, None).values()) == 1
    )
    with pytest.raises(ValueError, match="unknown class"):
        class_counts(5, {"kidney": 1})


def test_phantom_site_balance_manifest_and_determinism(tmp_path):
    profile = PROFILES["thick-slice-noisy"]
    mix = {"normal": 1, "cyst": 1, "tumour": 1, "stone": 5}
    a = write_cls_site(tmp_path / "a", profile, 16, class_mix=mix, seed=4)
    b = write_cls_site(tmp_path / "b", profile, 16, class_mix=mix, seed=4)
    c = write_cls_site(tmp_path / "c", profile, 16, class_mix=mix, seed=5)
    labels = [r.split(",")[1] for r in a.read_text().splitlines()[1:]]
    assert {k: labels.count(k) for k in CLASSES} == {
        "normal": 2,
        "cyst": 2,
        "tumour": 2,
        "stone": 10,
    }
    assert a.read_text() == b.read_text()
    for i in range(16):
        name = f"images/case_{i:05d}.nii.gz"
        assert (tmp_path / "a" / name).read_bytes() == (
            tmp_path / "b" / name
        ).read_bytes()
    assert a.read_text() != c.read_text()
    # A rerun keeps the site; other settings need overwrite.
    write_cls_site(tmp_path / "a", profile, 16, class_mix=mix, seed=4)
    with pytest.raises(FileExistsError, match="other settings"):
        write_cls_site(tmp_path / "a", profile, 16, seed=4)


def test_phantom_hu_by_class_and_scanner_profile():
    thin, thick = PROFILES["thin-slice-cm"], PROFILES["thick-slice-noisy"]
    for seed in range(5):
        stone = generate_slice(thick, "stone", seed)
        normal = generate_slice(thick, "normal", seed)
        cyst = generate_slice(thin, "cyst", seed)
        assert stone.image.max() > 300  # a stone, even after partial volume
        assert normal.image.max() < 300
        # water density present in a cyst slice: many pixels within 0-20 HU +- noise
        assert ((cyst.image > -25) & (cyst.image < 45)).sum() > 20
    assert (
        generate_slice(thin, "normal", 0).spacing[0]
        < generate_slice(thick, "normal", 0).spacing[0]
    )
    with pytest.raises(ValueError, match="unknown class"):
        generate_slice(thin, "kidney", 0)


# --- metrics -----------------------------------------------------------------


def test_metrics_on_hand_made_predictions():
    y = [0, 0, 1, 1, 2, 3]
    pred = [0, 1, 1, 1, 2, 0]
    probs = np.eye(4)[pred] * 0.7 + 0.075  # arg-max = pred
    m = classification_metrics(y, probs, NAMES)
    assert m[wire.ACCURACY] == pytest.approx(4 / 6)
    # recalls: normal 1/2, cyst 2/2, tumour 1/1, stone 0/1
    assert m[wire.recall_key("normal")] == 0.5 and m[wire.recall_key("stone")] == 0
    assert m[wire.BALANCED_ACCURACY] == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    assert m[wire.confusion_key("normal", "cyst")] == 1
    assert m[wire.confusion_key("stone", "normal")] == 1
    assert m[wire.confusion_key("cyst", "cyst")] == 2
    assert sum(v for k, v in m.items() if k.startswith("cm-")) == 6
    assert m[wire.AUC_MACRO] > 0.5


def test_auc_by_hand_and_absent_classes():
    # positives scored 0.9, 0.4; negatives 0.8, 0.1: 3 of 4 pairs ordered
    assert binary_auc([0.9, 0.4, 0.8, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)
    assert binary_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie is half
    assert np.isnan(binary_auc([0.1, 0.2], [1, 1]))
    # stone absent from this validation set: no recall-stone, no NaN anywhere
    probs = np.array([[0.8, 0.1, 0.05, 0.05], [0.2, 0.7, 0.05, 0.05]])
    m = classification_metrics([0, 1], probs, NAMES)
    assert wire.recall_key("stone") not in m and m[wire.BALANCED_ACCURACY] == 1.0
    assert m[wire.AUC_MACRO] == 1.0 and all(np.isfinite(list(m.values())))
    assert len(classification_metrics([], np.zeros((0, 4)), NAMES)) == 16


def test_class_weights_inverse_frequency_capped():
    w = class_weights_from_counts([10, 10, 5, 0])
    assert w[3] == 1.0 and w[2] == pytest.approx(2 * w[0])
    assert np.mean(w[:3]) == pytest.approx(1.0)
    w = class_weights_from_counts([1000, 1, 0, 0], cap=10)
    assert w[1] / w[0] == pytest.approx(10)


# --- models under Opacus -----------------------------------------------------


@pytest.mark.parametrize("name", CLS_MODELS)
def test_classifiers_are_opacus_clean_and_take_a_private_step(name):
    model = build_model(name, 1, 4, seed=0)
    assert ModuleValidator.validate(model, strict=False) == []
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 4)
    if sum(p.numel() for p in model.parameters()) > 1_000_000:
        return  # resnet18 / densenet121: forward only here (for GPUs)
    x, y = torch.randn(6, 1, 64, 64), torch.tensor([0, 1, 2, 3, 0, 1])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=3
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    net, opt, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=MODELS[name].grad_sample_mode,
    )
    torch.manual_seed(0)
    # Poisson sampling can draw an empty batch; take the first non-empty one.
    xb, yb = next((xb, yb) for _ in range(20) for xb, yb in loader if len(yb))
    torch.nn.functional.cross_entropy(net(xb), yb).backward()
    assert all(p.grad_sample is not None for p in net.parameters())
    opt.step()
    assert any(
        not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)
    )


def test_plan_model_outputs_follow_class_names():
    model = build_plan_model(cls_plan(**{"class-names": "normal,stone"}))
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2)
    with pytest.raises(ValueError, match="segmentation network"):
        build_plan_model(cls_plan(model="unet-tiny"))


# --- the task plug-in ---------------------------------------------------------


def test_task_trains_with_dp_evaluates_and_predicts(tmp_path):
    mix = {"normal": 1, "cyst": 1, "tumour": 1, "stone": 3}
    site = load_site_config(write_cls_yaml(tmp_path, "t", cases=24, mix=mix))
    write_site_phantom(site)
    plan = cls_plan(**{"class-balance": "sampler"})  # DP on: weighted loss instead
    task = get_task("classification")
    data = task.load_data(site, plan)
    assert data.n_train + data.n_val == 24 and data.n_val >= 4
    # under DP no weight is derived from the site's label counts
    assert task.class_weights is None
    image, label = data.train[0]
    assert image.shape == (1, 32, 32) and label.dtype == torch.long
    model = build_plan_model(plan)
    data.train.set_seed(1)
    stats = local_train(
        model,
        data.train,
        task.loss(plan),
        epochs=1,
        batch_size=8,
        learning_rate=0.003,
        optimizer="adam",
        device=torch.device("cpu"),
        seed=1,
        dp=DPSpec(1.0, 1.0, MODELS[plan.model].grad_sample_mode),
    )
    assert stats.steps >= 1 and np.isfinite(stats.loss)
    m = task.evaluate(model, data, plan, torch.device("cpu"))
    assert 0 <= m[wire.BALANCED_ACCURACY] <= 1 and wire.EVAL_LOSS in m
    assert sum(v for k, v in m.items() if k.startswith("cm-")) == data.n_val
    image_path = site.data.root / "images" / "case_00000.nii.gz"
    out = task.predict(model, image_path, plan, torch.device("cpu"), tmp_path / "p")
    assert out["class"] in NAMES
    assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    saved = json.loads((tmp_path / "p" / "case_00000.json").read_text())
    assert saved["class"] == out["class"]


def test_sampler_without_dp_redraws_balanced(tmp_path):
    mix = {"normal": 1, "stone": 7}
    site = load_site_config(
        write_cls_yaml(tmp_path, "s", cases=40, mix=mix, privacy={"enabled": False})
    )
    write_site_phantom(site)
    task = get_task("classification")
    data = task.load_data(site, cls_plan(**{"class-balance": "sampler"}))
    assert task.class_weights is None  # balanced by resampling, plain loss
    data.train.set_seed(3)
    drawn = [int(data.train[i][1]) for i in range(len(data.train))]
    assert 0.3 < drawn.count(0) / len(drawn) < 0.7  # 1 in 8 before the redraw


def test_weighted_loss_is_a_plain_mean_over_samples():
    from client.tasks.classification.task import WeightedCrossEntropy

    logits = torch.randn(4, 4)
    y = torch.tensor([0, 1, 2, 3])
    w = (1.0, 2.0, 3.0, 4.0)
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    expected = (per * torch.tensor(w)).mean()  # not divided by the sum of weights
    assert torch.allclose(WeightedCrossEntropy(w)(logits, y), expected)


def test_dp_class_weights_do_not_depend_on_label_counts(tmp_path, caplog):
    mix = {"normal": 1, "cyst": 1, "tumour": 1, "stone": 5}
    task = get_task("classification")
    plain = torch.nn.functional.cross_entropy
    logits, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 3, 3, 3, 3])
    for i, m in enumerate((mix, {"normal": 5, "cyst": 1, "tumour": 1, "stone": 1})):
        site = load_site_config(write_cls_yaml(tmp_path, f"dp{i}", cases=16, mix=m))
        write_site_phantom(site)
        task.load_data(site, cls_plan())  # class-balance=loss, no class-weights
        assert task.class_weights is None  # uniform, whatever the mix
        assert torch.allclose(task.loss(cls_plan())(logits, y), plain(logits, y))
        assert "class-weights" in caplog.text
        task.load_data(site, cls_plan(**{"class-weights": "1,2,3,4"}))
        assert task.class_weights == (1, 2, 3, 4)  # the plan's choice, as given
    off = write_cls_yaml(tmp_path, "off", 16, mix=mix, privacy={"enabled": False})
    write_site_phantom(load_site_config(off))
    task.load_data(load_site_config(off), cls_plan())
    w = task.class_weights
    assert w is not None and w[0] > w[3]  # without DP: inverse to the counts


def _patient_manifest(tmp_path, groups, splits=None):
    """12 phantom slices re-listed with a patient column: ``groups`` maps a
    patient id to slice numbers; the other slices are their own patients."""
    site = load_site_config(write_cls_yaml(tmp_path, "p", cases=12))
    write_site_phantom(site)
    manifest = site.data.root / "manifest.csv"
    rows = manifest.read_text().splitlines()[1:]
    owner = {i: p for p, members in groups.items() for i in members}
    splits = splits or {}
    manifest.write_text(
        "image,label,split,patient\n"
        + "".join(
            f"{r},{splits.get(i, '')},{owner.get(i, '')}\n" for i, r in enumerate(rows)
        )
    )
    return site


def test_dataset_items_are_patients_and_give_one_of_their_slices(tmp_path):
    from client.tasks.classification.data import build_dataset

    site = _patient_manifest(tmp_path, {"anna": [0, 1, 2], "ben": [3, 4]})
    cases = discover_classes(site, cls_plan())
    ds = build_dataset(cases, cls_plan())
    assert len(ds) == 9 and len(ds.labels) == 12  # 7 own + anna + ben
    anna = next(i for i, g in enumerate(ds.patients) if len(g) == 3)
    seen = set()
    for seed in range(40):
        ds.set_seed(seed)
        x, label = ds[anna]
        hits = [j for j in ds.patients[anna] if torch.equal(x, ds.images[j])]
        assert hits and int(label) == int(ds.labels[hits[0]])
        seen.add(hits[0])
    assert seen == set(ds.patients[anna])  # each of anna's slices gets drawn
    task = get_task("classification")
    data = task.load_data(site, cls_plan())
    assert data.n_train + data.n_val == 9  # patients, not slices
    assert len(data.train.labels) + len(data.validation.labels) == 12
    groups = data.train.patients + data.validation.patients
    assert sorted(map(len, groups)) == [1] * 7 + [2, 3]  # never split up


def test_patient_split_across_training_and_validation_is_refused(tmp_path):
    site = _patient_manifest(tmp_path, {"anna": [0, 1]}, {0: "train", 1: "val"})
    with pytest.raises(SiteDataError, match="patient anna is in both training"):
        get_task("classification").load_data(site, cls_plan())


def test_identical_slices_under_two_patients_are_refused(tmp_path):
    site = _patient_manifest(tmp_path, {})
    images = site.data.root / "images"
    (images / "case_00005.nii.gz").write_bytes(
        (images / "case_00004.nii.gz").read_bytes()
    )
    with pytest.raises(SiteDataError, match="identical images") as err:
        get_task("classification").load_data(site, cls_plan())
    assert "case_00004.nii.gz" in str(err.value)
    assert "case_00005.nii.gz" in str(err.value)
