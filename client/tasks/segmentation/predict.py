"""Segmentation prediction on one NIfTI scan, in the scan's own grid.

The plan's preprocessing (RAS reorientation, resampling to ``spacing-mm``, HU
window, crop to the body, normalisation) is applied with MONAI transforms that
record what they did; after sliding-window inference the label map is taken back
through the inverse of each spatial step (MONAI ``Invertd``, nearest neighbour),
so it lands exactly on the input's voxel grid and affine, whatever the input's
orientation and spacing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import nn

from client.tasks.segmentation.pipeline import IMAGE, window_crop_normalise
from common.config import Plan
from common.metrics import LABELS

log = logging.getLogger(__name__)

PRED = "pred"


def image_transforms(plan: Plan) -> mt.Compose:
    """The training pipeline's deterministic steps, for an image alone."""
    return mt.Compose(
        [
            mt.LoadImaged(keys=[IMAGE], image_only=True, reader="NibabelReader"),
            mt.EnsureChannelFirstd(keys=[IMAGE]),
            mt.Orientationd(keys=[IMAGE], axcodes="RAS"),
            mt.Spacingd(keys=[IMAGE], pixdim=plan.spacing_mm, mode="bilinear"),
            *window_crop_normalise(plan, keys=(IMAGE,)),
            mt.EnsureTyped(keys=[IMAGE], dtype=torch.float32),
        ]
    )


@torch.no_grad()
def segment(
    model: nn.Module, image: Path, plan: Plan, device: torch.device
) -> np.ndarray:
    """Label map (0 background, 1 kidney, 2 tumour, 3 cyst) on ``image``'s grid.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of the input's shape (its first three axes), in the
        input's own voxel order.
    """
    pre = image_transforms(plan)
    data = pre({IMAGE: str(image)})
    img = data[IMAGE]
    model.to(device).eval()
    logits = sliding_window_inference(
        img.as_tensor().unsqueeze(0).to(device),
        plan.patch_size,
        sw_batch_size=16,
        predictor=model,
        overlap=0.25,
    )
    pred = logits.argmax(1).to(torch.float32).cpu()  # (1, *spatial): a channel
    data[PRED] = MetaTensor(
        pred, meta=dict(img.meta), applied_operations=list(img.applied_operations)
    )
    inverse = mt.Invertd(
        keys=[PRED], transform=pre, orig_keys=[IMAGE], nearest_interp=True
    )
    out = inverse(data)[PRED]
    labels = np.rint(np.asarray(out[0])).astype(np.uint8)
    shape = nib.load(str(image)).shape[:3]
    if labels.shape != tuple(shape):  # a MONAI change would show up here, loudly
        raise RuntimeError(
            f"{image}: inverted prediction has shape {labels.shape}, the scan "
            f"{tuple(shape)}; please report this"
        )
    return labels


def label_volumes_ml(labels: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Volume in mL of each foreground label, from the voxel size in ``affine``."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(LABELS))
    return {
        name: float(counts[value]) * voxel_ml
        for value, name in LABELS.items()
        if value != 0
    }


def predict_scan(
    model: nn.Module,
    image: Path,
    plan: Plan,
    device: torch.device,
    output: Path | None,
) -> dict[str, Any]:
    """Segment ``image``; write the label map to ``output`` (NIfTI, the input's
    grid, affine and orientation) when given; return volumes in mL."""
    labels = segment(model, image, plan, device)
    src = nib.load(str(image))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        header = src.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
        out = nib.Nifti1Image(labels, src.affine, header)
        out.set_qform(src.affine, code=int(src.header["qform_code"]) or 1)
        out.set_sform(src.affine, code=int(src.header["sform_code"]) or 1)
        nib.save(out, str(output))
    volumes = label_volumes_ml(labels, src.affine)
    return {
        "image": str(image),
        "output": str(output) if output is not None else None,
        "shape": list(labels.shape),
        "volumes-ml": volumes,
    }
