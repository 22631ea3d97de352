"""Training patches (issue 19): label-aware crops and augmentation."""

from __future__ import annotations

import torch

from client.tasks.segmentation.task import SegmentationTask
from common.config import Plan


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
