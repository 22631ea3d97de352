"""Training patches (issue 19): label-aware crops and augmentation; each
patient's randomness is its own (issue 27)."""

from __future__ import annotations

import random

import pytest
import torch

from client.data.class_layouts import discover_classes
from client.tasks.classification.data import build_dataset
from client.tasks.segmentation.cases import load_site_cases
from client.tasks.segmentation.pipeline import PatchDataset, volume_dataset
from client.tasks.segmentation.task import SegmentationTask
from common.config import Plan, load_site_config
from sim.phantoms.sites import write_site_phantom
from tests.fakes import cls_plan, write_cls_yaml, write_site_yaml


def _share_with_tumour(site, **keys) -> float:
    plan = Plan.model_validate(
        {"spacing-mm": "6,6,8", "patch-size": "16,16,16", "batch-size": 2, **keys}
    )
    data = SegmentationTask().load_data(site, plan)
    data.train.set_seed(0)
    hits = draws = 0
    for _ in range(8):
        for i in range(len(data.train)):
            _, label = data.train[i]
            hits += bool((label == 2).any())
            draws += 1
    return hits / draws


def test_label_class_crops_show_tumours_more_often(tiny_site):
    plain = _share_with_tumour(tiny_site)
    aware = _share_with_tumour(
        tiny_site,
        **{"patch-sampling": "label-classes", "patch-class-ratios": "1,1,4,1"},
    )
    assert aware > plain + 0.15, (plain, aware)


def test_augmentation_flips_image_and_label_together(tiny_site):
    plan = Plan.model_validate(
        {"spacing-mm": "6,6,8", "patch-size": "16,16,16", "augmentation": True}
    )
    data = SegmentationTask().load_data(tiny_site, plan)
    data.train.set_seed(0)
    checked = 0
    for _ in range(5):
        for i in range(len(data.train)):
            image, label = data.train[i]
            assert image.shape[1:] == label.shape[1:] == torch.Size([16, 16, 16])
            # a flip moves both: where the label says kidney, the image is
            # still the bright, contrast-enhanced parenchyma
            kidney = label[0] == 1
            if kidney.sum() > 10 and (~kidney).sum() > 10:
                assert image[0][kidney].mean() > image[0][~kidney].mean()
                checked += 1
    assert checked >= 5


# --- each patient's randomness is its own (issue 27) ---------------------------

SAMPLINGS = [
    {},
    {"patch-sampling": "label-classes", "patch-class-ratios": "1,1,4,1"},
]


def _patch_plan(**keys) -> Plan:
    return Plan.model_validate(
        {
            "spacing-mm": "6,6,8",
            "patch-size": "16,16,16",
            "augmentation": True,
            **keys,
        }
    )


def _patches(site, plan, cases, seed, order, draws=3) -> dict:
    """Image path -> its patches of draws 0..draws-1 after ``set_seed(seed)``,
    fetched in passes over ``order`` (a permutation of the indices)."""
    data = PatchDataset(volume_dataset(cases, site, plan), plan)
    data.set_seed(seed)
    out: dict[str, list] = {str(c.image): [] for c in cases}
    for _ in range(draws):
        for i in order:
            out[str(cases[i].image)].append(data[i])
    return out


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["foreground", "label-classes"])
def test_patches_do_not_depend_on_the_other_patients(tmp_path, sampling):
    # One patient left out and the rest fetched in another order: every other
    # patient's crops and augmentation are bit-identical. With one random
    # stream per round (the code before issue 27) a patient's patch depended
    # on the patients fetched before it and on their labels.
    site = load_site_config(write_site_yaml(tmp_path, "own", cases=8))
    plan = _patch_plan(**sampling)
    cases = load_site_cases(site).train
    assert len(cases) >= 4
    full = _patches(site, plan, cases, 11, range(len(cases)))
    rest = cases[:1] + cases[2:]  # without the second patient
    order = list(range(len(rest)))
    random.Random(5).shuffle(order)
    assert order != sorted(order)
    fewer = _patches(site, plan, rest, 11, order)
    assert str(cases[1].image) not in fewer
    for path, draws in fewer.items():
        assert len(draws) == 3
        for k in range(3):
            assert _same(draws[k], full[path][k]), (path, k)


def test_draws_differ_and_the_seed_matters(tmp_path):
    site = load_site_config(write_site_yaml(tmp_path, "draws", cases=6))
    plan = _patch_plan()
    cases = load_site_cases(site).train
    order = range(len(cases))
    first = _patches(site, plan, cases, 3, order)
    for draws in first.values():
        # the draw counter: a patient's next patch is a new one
        assert not _same(draws[0], draws[1]) and not _same(draws[1], draws[2])
    again = _patches(site, plan, cases, 3, order)
    other = _patches(site, plan, cases, 4, order)
    for path, draws in first.items():
        # set_seed starts the round afresh: the same seed repeats every draw
        assert all(_same(a, b) for a, b in zip(draws, again[path], strict=True))
        assert not _same(draws[0], other[path][0])


def test_patch_keys_must_be_one_per_case(tiny_site, tiny_plan):
    vols = volume_dataset(load_site_cases(tiny_site).train, tiny_site, tiny_plan)
    with pytest.raises(ValueError, match="keys for"):
        PatchDataset(vols, tiny_plan, keys=["a"])
    with pytest.raises(TypeError, match="stable key"):
        PatchDataset(list(range(3)), tiny_plan)  # type: ignore[arg-type]


def _cls_site(tmp_path):
    """12 phantom slices, two patients with several slices (anna, ben), the
    others their own patients."""
    site = load_site_config(write_cls_yaml(tmp_path, "cls", cases=12))
    write_site_phantom(site)
    manifest = site.data.root / "manifest.csv"
    rows = manifest.read_text().splitlines()[1:]
    owner = {0: "anna", 1: "anna", 2: "anna", 5: "ben", 6: "ben"}
    manifest.write_text(
        "image,label,split,patient\n"
        + "".join(f"{r},,{owner.get(i, '')}\n" for i, r in enumerate(rows))
    )
    return site


def _slices(cases, seed, shuffle=None, draws=4) -> dict:
    """Patient id -> its items of draws 0..draws-1 after ``set_seed(seed)``,
    fetched in passes over the patients (shuffled by the seed ``shuffle``)."""
    data = build_dataset(cases, cls_plan(), augment=True)
    ids = list(dict.fromkeys(c.patient_id for c in cases))
    assert len(ids) == len(data)
    order = list(range(len(data)))
    if shuffle is not None:
        random.Random(shuffle).shuffle(order)
        assert order != sorted(order)
    data.set_seed(seed)
    out: dict[str, list] = {p: [] for p in ids}
    for _ in range(draws):
        for i in order:
            out[ids[i]].append(data[i])
    return out


def test_slices_and_flips_do_not_depend_on_the_other_patients(tmp_path):
    # Classification's training items: which of a patient's slices, and its
    # flips, come from (seed, patient, draw) alone. Before issue 27 one
    # generator served every patient in the order they were fetched.
    cases = discover_classes(_cls_site(tmp_path), cls_plan())
    full = _slices(cases, 7)
    gone = cases[3].patient_id
    rest = [c for c in cases if c.patient_id != gone]
    fewer = _slices(rest, 7, shuffle=2)
    assert gone not in fewer and "anna" in fewer
    for patient, draws in fewer.items():
        for k, item in enumerate(draws):
            assert _same(item, full[patient][k]), (patient, k)
    # the draw counter and the seed: anna's items vary across draws and seeds
    anna = [x for x, _ in full["anna"]]
    assert any(not torch.equal(anna[0], x) for x in anna[1:])
    other = _slices(cases, 8)
    assert any(
        not _same(a, b) for p in full for a, b in zip(full[p], other[p], strict=True)
    )
