"""``kidneyfl predict`` for a prognosis model: one scan -> a risk score and a
survival curve (JSON and a plot).

The crop needs the scan's kidney and tumour. They come, in this order, from a
label map on the scan's grid (``--labels``), from the ``segmentation.nii.gz``
beside a KiTS case's ``imaging.nii.gz``, or from a trained kidneyfl
segmentation model (``--segmentation-model``); the output says which
(``crop-labels``), because a crop from a prediction carries the segmentation
model's errors. The covariates the model was trained with come from
``--age`` and ``--sex`` (unknown ones are 0, as for a training patient
without them, and the output lists them) and the tumour's size measured on
the labels.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from client.data.subgroups import age_band
from client.tasks.prognosis.data import covariates, patient_input, scan_crop
from common.atomic import atomic_write_text
from common.config import Plan
from common.survival import risk_score, survival_curve

log = logging.getLogger("kidneyfl.client")


class _Covariates:
    """What :func:`client.tasks.prognosis.data.covariates` reads of an outcome."""

    def __init__(self, age: float | None, sex: str | None) -> None:
        self.age_band = age_band(age) if age is not None else None
        self.sex = {"female": "f", "male": "m"}.get(sex or "", sex)


def scan_labels(
    image: Path,
    labels: Path | None,
    segmentation_model: Path | None,
    device: torch.device,
) -> tuple[np.ndarray, str]:
    """The label map the crop is taken from, on the scan's grid, and where it
    came from.

    Raises
    ------
    ValueError
        No source of labels, or a label map on another grid.
    """
    image = Path(image)
    if labels is None and image.name == "imaging.nii.gz":
        beside = image.with_name("segmentation.nii.gz")
        labels = beside if beside.is_file() else None
    if labels is not None:
        lab = nib.load(str(labels))
        shape = nib.load(str(image)).shape
        if lab.shape[:3] != shape[:3]:
            raise ValueError(
                f"{labels}: label map of shape {lab.shape} is not on the grid of "
                f"{image} ({shape}); pass the label map of this scan"
            )
        return np.asarray(lab.dataobj).astype(
            np.uint8
        ), f"reference labels ({labels.name})"
    if segmentation_model is None:
        raise ValueError(
            f"{image}: a prognosis model crops around the kidney and tumour; pass "
            "--labels FILE (a KiTS label map on the scan's grid) or "
            "--segmentation-model CHECKPOINT (a trained kidneyfl segmentation model)"
        )
    from client.tasks.segmentation.task import SegmentationTask

    seg_model, seg_plan, name = segmentation_model
    if seg_plan.task != "segmentation":
        raise ValueError(
            f"{name}: a {seg_plan.task} model; --segmentation-model needs a "
            "segmentation model"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "labels.nii.gz"
        SegmentationTask().predict(seg_model, image, seg_plan, device, out)
        lab = np.asarray(nib.load(str(out)).dataobj).astype(np.uint8)
    return lab, f"predicted by {name}"


@torch.no_grad()
def predict_prognosis(
    task: Any,
    model: nn.Module,
    image: Path,
    plan: Plan,
    device: torch.device,
    output: Path | None = None,
    labels: Path | None = None,
    segmentation_model: tuple[nn.Module, Plan, str] | None = None,
    age: float | None = None,
    sex: str | None = None,
) -> dict[str, Any]:
    """Risk score and survival curve of one scan.

    ``output`` is a ``.json`` file, or a folder that gets ``<scan name>.json``;
    beside it goes ``<scan name>_survival.png``. The risk score is the
    cumulative hazard at the last edge (higher is worse; it ranks patients and
    is not a probability); the curve is the predicted probability of being
    event-free at each edge.
    """
    image = Path(image)
    lab, source = scan_labels(
        image, Path(labels) if labels else None, segmentation_model, device
    )
    # the plan's modality: an MR model z-scores its crops (a "mixed" plan's
    # scans are CT unless the model was trained on MR only)
    crop, _ = scan_crop(image, lab, plan, mr=plan.modality == "MR")
    covs = covariates(_Covariates(age, sex), crop.size_cm, plan, crop.radiomics)  # type: ignore[arg-type]
    x = patient_input(crop, covs)[None]
    logits = task.outputs(model, x, device)
    curve = survival_curve(logits)[0].tolist()
    edges = plan.survival_edges_days
    unknown = [
        name
        for name, given in (("age", age is not None), ("sex", sex is not None))
        if name in plan.prognosis_covariates and not given
    ]
    summary: dict[str, Any] = {
        "task": "prognosis",
        "image": str(image),
        "risk-score": float(risk_score(logits)[0]),
        "survival": {f"{d:g}": s for d, s in zip(edges, curve, strict=True)},
        "crop-labels": source,
        "crop-centre": crop.centre,
        "tumour-size-cm": round(crop.size_cm, 2),
        "covariates-unknown": unknown,
    }
    for h in plan.survival_horizons_days:
        below = [s for d, s in zip(edges, curve, strict=True) if d <= h]
        summary[f"survival-{h:g}d"] = below[-1] if below else 1.0
    if unknown:
        log.warning(
            "%s: %s not given (--age, --sex): treated as unknown", image, unknown
        )
    if output is not None:
        output = Path(output)
        stem = image.name.split(".")[0]
        if stem == "imaging":
            stem = image.parent.name
        if output.suffix.lower() != ".json":
            output = output / f"{stem}.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        png = output.parent / f"{stem}_survival.png"
        write_curve_png(edges, curve, png, f"{stem}: risk {summary['risk-score']:.2f}")
        summary["plot"] = str(png)
        atomic_write_text(output, json.dumps(summary, indent=2) + "\n")
        summary["output"] = str(output)
    return summary


def write_curve_png(
    edges: tuple[float, ...], curve: list[float], path: Path, title: str
) -> None:
    """The predicted survival curve as a step plot (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.step([0.0, *edges], [1.0, *curve], where="post", color="#1f5fa8")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, edges[-1])
    ax.set_xlabel("days after the scan")
    ax.set_ylabel("predicted event-free")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
