"""Segmentation prediction on one NIfTI scan, in the scan's own grid.

The plan's preprocessing (RAS reorientation, resampling to ``spacing-mm``, HU
window, crop to the body, normalisation; for an MR model, no window and each
scan normalised within its body) is applied with MONAI transforms that
record what they did; after sliding-window inference the label map is taken back
through the inverse of each spatial step (MONAI ``Invertd``, nearest neighbour),
so it lands exactly on the input's voxel grid and affine, whatever the input's
orientation and spacing.

Test-time augmentation (TTA) averages the softmax probabilities of the scan and
of its mirror images along each spatial axis of the network's grid, each flipped
back before averaging. Flips were chosen over MONAI's ``TestTimeAugmentation``
and over Monte Carlo dropout: ``TestTimeAugmentation`` draws random invertible
transforms and resamples each prediction back through its inverse (interpolation
on every pass), whereas a flip in the network's grid is its own exact inverse
and costs nothing to undo; and the registered U-Nets have no dropout layers to
sample. The uncertainty reported per voxel is the normalised predictive entropy
of the averaged probabilities, ``H(p) / log(C)`` in [0, 1] (0: one class
certain; 1: all four classes equally likely). It reflects disagreement between
the passes and the model's own softmax spread, not a calibrated error rate.

Post-processing (:func:`common.postprocess.apply_rule`) runs in the network's
grid, where the rules' spacing is the plan's; the label map, the uncertainty
and the tumour and cyst probabilities are then taken back to the scan's grid
(labels nearest neighbour, the maps linearly; outside the cropped body the maps
are 0).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import nn

from client.tasks.segmentation.measures import kidney_measures, tumour_measures
from client.tasks.segmentation.pipeline import IMAGE, window_crop_normalise
from client.tasks.segmentation.summary import HU_WINDOW, write_summary_png
from common.config import Plan
from common.lesions import components
from common.metrics import LABELS
from common.postprocess import apply_rule, without_probability

log = logging.getLogger(__name__)

PRED, MAPS = "pred", "maps"
TUMOUR, CYST = 2, 3
# Default TTA: identity plus one flip along each of the three spatial axes.
DEFAULT_TTA = 3
UNCERTAINTY_SUFFIX = "_uncertainty.nii.gz"
SUMMARY_SUFFIX = "_summary.png"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


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


def flip_dims(tta: int, spatial_dims: int = 3) -> list[tuple[int, ...]]:
    """The dimensions each TTA pass flips, for a ``(B, C, *spatial)`` tensor.

    ``tta=0`` is a single unflipped pass; ``tta=k`` adds one pass flipped
    along each of the first ``k`` spatial axes.

    Raises
    ------
    ValueError
        If ``tta`` is not in ``0..spatial_dims``.
    """
    if not 0 <= tta <= spatial_dims:
        raise ValueError(
            f"tta must be 0 (no test-time augmentation) to {spatial_dims} (a flip "
            f"along each spatial axis), got {tta}"
        )
    return [(), *[(2 + axis,) for axis in range(tta)]]


@torch.no_grad()
def infer_probs(
    model: nn.Module,
    image: torch.Tensor,
    plan: Plan,
    device: torch.device,
    tta: int = DEFAULT_TTA,
) -> torch.Tensor:
    """Softmax probabilities of a preprocessed volume, averaged over TTA flips.

    Parameters
    ----------
    model : torch.nn.Module
        The segmentation network (logits ``(B, C, *patch)``); put in eval mode.
    image : torch.Tensor
        Preprocessed volume ``(1, channels, *spatial)`` in the plan's grid.
    plan : Plan
        Gives ``patch-size`` for the sliding window (16 windows a batch,
        overlap 0.25).
    device : torch.device
        Where the network runs.
    tta : int
        0 for no test-time augmentation; ``k`` adds a pass flipped along
        each of the first ``k`` spatial axes (3: all of them, 4 passes).

    Returns
    -------
    torch.Tensor
        ``(C, *spatial)`` float32 probabilities on ``device``, summing to 1
        over classes.
    """
    if isinstance(image, MetaTensor):
        image = image.as_tensor()
    passes = flip_dims(tta, image.dim() - 2)
    model.to(device).eval()
    x = image.to(device)
    total: torch.Tensor | None = None
    for dims in passes:
        logits = sliding_window_inference(
            torch.flip(x, dims) if dims else x,
            plan.patch_size,
            sw_batch_size=16,
            predictor=model,
            overlap=0.25,
        )
        probs = torch.softmax(logits.float(), dim=1)
        probs = torch.flip(probs, dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None  # flip_dims always gives the identity pass
    return total[0] / len(passes)


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy over the class axis (0) divided by ``log(C)``: [0, 1]."""
    entropy = -torch.special.xlogy(probs, probs).sum(0)
    return (entropy / math.log(probs.shape[0])).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class ScanPrediction:
    """A prediction on the scan's own grid.

    Attributes
    ----------
    labels : numpy.ndarray
        ``uint8`` label map (0 background, 1 kidney, 2 tumour, 3 cyst).
    uncertainty : numpy.ndarray or None
        ``float32`` normalised predictive entropy in [0, 1].
    class_probs : dict of int to numpy.ndarray
        ``float32`` probability of tumour (2) and cyst (3).
    """

    labels: np.ndarray
    uncertainty: np.ndarray | None
    class_probs: dict[int, np.ndarray]


def _like(img: MetaTensor, data: torch.Tensor) -> MetaTensor:
    """``data`` with ``img``'s metadata and transform history, for Invertd."""
    return MetaTensor(
        data, meta=dict(img.meta), applied_operations=list(img.applied_operations)
    )


@torch.no_grad()
def predict_maps(
    model: nn.Module,
    image: Path,
    plan: Plan,
    device: torch.device,
    postprocess: str = "none",
    tta: int = DEFAULT_TTA,
    maps: bool = True,
) -> ScanPrediction:
    """Labels (post-processed in the network's grid) and, with ``maps``, the
    uncertainty and class probabilities, all on ``image``'s grid."""
    pre = image_transforms(plan)
    data = pre({IMAGE: str(image)})
    img = data[IMAGE]
    probs = infer_probs(model, img.as_tensor().unsqueeze(0), plan, device, tta)
    probs = probs.cpu()
    labels = apply_rule(
        probs.argmax(0).numpy().astype(np.uint8),
        probs.numpy(),
        plan.spacing_mm,
        postprocess,
    )
    data[PRED] = _like(img, torch.from_numpy(labels).to(torch.float32)[None])
    keys, nearest = [PRED], [True]
    if maps:
        stacked = torch.stack([normalised_entropy(probs), probs[TUMOUR], probs[CYST]])
        data[MAPS] = _like(img, stacked)
        keys, nearest = [PRED, MAPS], [True, False]
    inverse = mt.Invertd(
        keys=keys,
        transform=pre,
        orig_keys=[IMAGE] * len(keys),
        nearest_interp=nearest,
    )
    out = inverse(data)
    shape = tuple(nib.load(str(image)).shape[:3])
    labels = np.rint(np.asarray(out[PRED][0])).astype(np.uint8)
    if (structural := without_probability(postprocess)) != "none":
        # resampling can split a thin component: the rule again, on this grid
        zooms = nib.load(str(image)).header.get_zooms()[:3]
        labels = apply_rule(labels, None, [float(z) for z in zooms], structural)
    back = np.clip(np.asarray(out[MAPS], np.float32), 0, 1) if maps else None
    for got in (labels, *([] if back is None else back)):
        if got.shape != shape:  # a MONAI change would show up here, loudly
            raise RuntimeError(
                f"{image}: inverted prediction has shape {got.shape}, the scan "
                f"{shape}; please report this"
            )
    if back is None:
        return ScanPrediction(labels, None, {})
    return ScanPrediction(labels, back[0], {TUMOUR: back[1], CYST: back[2]})


def segment(
    model: nn.Module,
    image: Path,
    plan: Plan,
    device: torch.device,
    tta: int = 0,
    postprocess: str = "none",
) -> np.ndarray:
    """Label map (0 background, 1 kidney, 2 tumour, 3 cyst) on ``image``'s grid.

    Without TTA by default, as before TTA existed (callers compare runs).

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of the input's shape (its first three axes), in the
        input's own voxel order.
    """
    return predict_maps(model, image, plan, device, postprocess, tta, maps=False).labels


def label_volumes_ml(labels: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Volume in mL of each foreground label, from the voxel size in ``affine``."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(LABELS))
    return {
        name: float(counts[value]) * voxel_ml
        for value, name in LABELS.items()
        if value != 0
    }


def lesion_table(
    labels: np.ndarray,
    affine: np.ndarray,
    class_probs: dict[int, np.ndarray],
    uncertainty: np.ndarray,
) -> list[dict[str, Any]]:
    """One entry per tumour and cyst component (26-connected), largest first.

    Returns
    -------
    list of dict
        ``{"region", "volume-ml", "confidence" (mean probability of its class
        over it), "uncertainty" (mean normalised entropy over it),
        "centroid-ras-mm"}``.
    """
    affine = np.asarray(affine, float)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    rows = []
    for value in (TUMOUR, CYST):
        lab, n = components(labels == value)
        if n == 0:
            continue
        index = np.arange(1, n + 1)
        counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        conf = ndimage.mean(class_probs[value], lab, index)
        unc = ndimage.mean(uncertainty, lab, index)
        centres = np.asarray(ndimage.center_of_mass(lab > 0, lab, index), float)
        world = centres.reshape(n, 3) @ affine[:3, :3].T + affine[:3, 3]
        for i in range(n):
            rows.append(
                {
                    "region": LABELS[value],
                    "volume-ml": round(float(counts[i]) * voxel_ml, 3),
                    "confidence": round(float(conf[i]), 3),
                    "uncertainty": round(float(unc[i]), 3),
                    "centroid-ras-mm": [round(float(c), 1) for c in world[i]],
                }
            )
    return sorted(rows, key=lambda r: -r["volume-ml"])


def _stem(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _save_like(
    src: nib.Nifti1Image,
    data: np.ndarray,
    path: Path,
    display: tuple[float, float] | None = None,
) -> None:
    """Write ``data`` on ``src``'s grid: its header, affine and orientation
    (``display``: the viewer's default range, NIfTI ``cal_min``/``cal_max``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = src.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1, 0)
    if display is not None:
        header["cal_min"], header["cal_max"] = display
    out = nib.Nifti1Image(data, src.affine, header)
    out.set_qform(src.affine, code=int(src.header["qform_code"]) or 1)
    out.set_sform(src.affine, code=int(src.header["sform_code"]) or 1)
    nib.save(out, str(path))


def _scan_hu(src: nib.Nifti1Image, modality: str = "CT") -> np.ndarray:
    data = np.asarray(src.dataobj, dtype=np.float32)
    data = data.reshape(*data.shape[:3], -1)[..., 0] if data.ndim > 3 else data
    if modality != "MR":
        return data
    # The summary's grey scale is a HU window; MR has no HU: its 1st-99th
    # percentiles are stretched onto that window, for display only.
    lo, hi = (float(v) for v in np.percentile(data, (1, 99)))
    scale = (HU_WINDOW[1] - HU_WINDOW[0]) / max(hi - lo, 1e-6)
    return (data - lo) * scale + HU_WINDOW[0]


def predict_scan(
    model: nn.Module,
    image: Path,
    plan: Plan,
    device: torch.device,
    output: Path | None,
    postprocess: str = "none",
    tta: int = DEFAULT_TTA,
    summary_image: bool = True,
) -> dict[str, Any]:
    """Segment ``image`` with its uncertainty and planning measures.

    Parameters
    ----------
    model, image, plan, device
        The network, the NIfTI scan, the effective plan, where to run.
    output : Path or None
        The label map's path (NIfTI, the input's grid, affine and
        orientation). Beside it go ``<stem>_uncertainty.nii.gz`` (float32
        normalised entropy, same grid) and, with ``summary_image``,
        ``<stem>_summary.png``. Nothing is written when ``None``.
    postprocess : str
        A :mod:`common.postprocess` rule, applied in the network's grid.
    tta : int
        Test-time flips (see :func:`infer_probs`); 0 for none.
    summary_image : bool
        Write the PNG summary (:func:`write_summary_png`) when ``output`` is
        given.

    Returns
    -------
    dict
        ``image``, ``output``, ``shape``, ``volumes-ml``, ``postprocess``,
        ``tta``, ``uncertainty-output``, ``uncertainty-mean-kidney`` (mean
        over predicted kidney and masses; ``None`` without them),
        ``lesions`` (:func:`lesion_table`), ``kidneys``
        (:func:`~client.tasks.segmentation.measures.kidney_measures`),
        ``tumours`` (:func:`~client.tasks.segmentation.measures.tumour_measures`)
        and ``summary-image`` (``None`` when not written).
    """
    pred = predict_maps(model, image, plan, device, postprocess, tta)
    labels, uncertainty = pred.labels, pred.uncertainty
    assert uncertainty is not None  # maps=True
    src = nib.load(str(image))
    affine = np.asarray(src.affine, float)
    tumours = tumour_measures(labels, affine)
    foreground = labels > 0
    result: dict[str, Any] = {
        "image": str(image),
        "output": str(output) if output is not None else None,
        "shape": list(labels.shape),
        "volumes-ml": label_volumes_ml(labels, affine),
        "postprocess": postprocess,
        "tta": tta,
        "uncertainty-output": None,
        "uncertainty-mean-kidney": (
            round(float(uncertainty[foreground].mean()), 4)
            if foreground.any()
            else None
        ),
        "lesions": lesion_table(labels, affine, pred.class_probs, uncertainty),
        "kidneys": kidney_measures(labels, affine),
        "tumours": tumours,
        "summary-image": None,
    }
    if output is None:
        return result
    output = Path(output)
    _save_like(src, labels, output)
    unc_path = output.parent / f"{_stem(output)}{UNCERTAINTY_SUFFIX}"
    _save_like(src, uncertainty.astype(np.float32), unc_path, display=(0.0, 1.0))
    result["uncertainty-output"] = str(unc_path)
    if summary_image:
        png = output.parent / f"{_stem(output)}{SUMMARY_SUFFIX}"
        write_summary_png(
            _scan_hu(src, plan.modality),
            labels,
            affine,
            tumours,
            png,
            uncertainty=uncertainty,
        )
        result["summary-image"] = str(png)
    return result
