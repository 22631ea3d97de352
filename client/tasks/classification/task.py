"""The classification task: one kidney CT slice -> normal, cyst, tumour, stone.

A plug-in of the task seam (``client/tasks/base.py``): data, loss, evaluation and
prediction. Training, DP-SGD, the privacy ledger, aggregation and checkpoints
are the federation's, shared with segmentation.

Class imbalance (plan key ``class-balance``):

- ``loss`` (default): cross-entropy weighted per class by the plan's
  ``class-weights`` or, without DP, inverse to the site's training counts,
  averaged with a plain mean over the batch. Under DP, weights from the counts
  would be a function of other patients' labels that DP-SGD does not account
  for, so the site uses the plan's ``class-weights`` or, if it has none, equal
  weights (with a warning naming the key). PyTorch's weighted ``mean`` divides
  by the batch's sum of weights, which would make each patient's gradient
  depend on who else was sampled; Opacus' per-sample clipping assumes it does
  not.
- ``sampler``: a class-balanced redraw of the slices each round. Under DP it is
  replaced by ``loss`` (with the DP rule for weights above): Opacus swaps any
  sampler for Poisson sampling (the privacy analysis requires it), and a redraw
  would show a patient more than once, so per-sample clipping would no longer
  bound one patient's influence.
- ``none``: plain cross-entropy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from client.data.check_report import DataCheck
from client.data.class_layouts import PNG_SUFFIXES
from client.disclosure import class_denominator
from client.tasks.base import TaskData
from client.tasks.classification import saliency
from client.tasks.classification.check import check_cases
from client.tasks.classification.data import (
    SliceDataset,
    build_dataset,
    fingerprint,
    load_site_slices,
    load_slice,
)
from common import wire
from common.atomic import atomic_write_text
from common.cls_metrics import class_weights_from_counts, classification_metrics
from common.config import Plan, SiteConfig

log = logging.getLogger(__name__)


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with fixed class weights and a plain mean over the batch.

    ``mean_i(w[y_i] * CE_i)``: each sample's term depends on that sample only,
    so per-sample gradients stay per patient under DP-SGD.
    """

    def __init__(self, weights: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.weights = tuple(weights) if weights else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target.long().view(-1), reduction="none")
        if self.weights is not None:
            w = torch.tensor(self.weights, dtype=ce.dtype, device=ce.device)
            ce = ce * w[target.long().view(-1)]
        return ce.mean()


class ClassificationTask:
    """Whole preloaded slices to train and to validate; a 2D classifier."""

    name = "classification"

    def __init__(self) -> None:
        # Set by load_data from the site's training counts; read by loss().
        self.class_weights: tuple[float, ...] | None = None

    def load_data(self, site: SiteConfig, plan: Plan) -> TaskData:
        """Read the manifest or class folders, skip unreadable images, split,
        preload, choose balancing.

        Raises
        ------
        SiteDataError
            With the file, CSV row and fix.
        """
        train_cases, val_cases, _ = load_site_slices(site, plan)
        dp = site.privacy.enabled
        sampler = plan.class_balance == "sampler" and not dp
        if plan.class_balance == "sampler" and dp:
            log.warning(
                "class-balance=sampler is replaced by class-weighted loss under DP: "
                "Opacus' Poisson sampling replaces samplers"
            )
        train = build_dataset(train_cases, plan, augment=True, balanced=sampler)
        val = build_dataset(val_cases, plan)
        counts = train.class_counts(len(plan.class_names))
        missing = [n for n, k in zip(plan.class_names, counts, strict=True) if not k]
        if missing:
            log.warning("site %s has no training case of %s", site.name, missing)
        self.class_weights = _class_weights(site, plan, counts, sampler)
        # Items are patients: n_train and n_val count patients, not slices.
        return TaskData(train, val, len(train), len(val), fingerprint(train))

    def check(self, site: SiteConfig, report: DataCheck) -> None:
        """The readiness check's data part: every image read, classes and
        patients counted per split, the patient rules applied."""
        check_cases(site, report)

    def loss(self, plan: Plan) -> nn.Module:
        """Cross-entropy, class-weighted as :meth:`load_data` chose."""
        return WeightedCrossEntropy(self.class_weights)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: TaskData, plan: Plan, device: torch.device
    ) -> dict[str, float]:
        """Accuracy, balanced accuracy, recall per class, macro AUC, confusion
        counts and the unweighted loss over the validation slices."""
        model.to(device).eval()
        val: SliceDataset = data.validation
        probs, losses = [], []
        for start in range(0, len(val.labels), 64):
            x = val.images[start : start + 64].to(device)
            y = val.labels[start : start + 64].to(device)
            logits = model(x)
            losses.append(F.cross_entropy(logits, y, reduction="sum").item())
            probs.append(torch.softmax(logits, 1).cpu())
        n = len(plan.class_names)
        p = torch.cat(probs).numpy() if probs else torch.zeros((0, n)).numpy()
        out = classification_metrics(val.labels.numpy(), p, plan.class_names)
        if len(val.labels):
            out[wire.EVAL_LOSS] = sum(losses) / len(val.labels)
        return out

    def denominators(self, data: TaskData, plan: Plan) -> dict[str, int]:
        """Validation patients per class, the count behind ``recall-<class>``
        and the confusion row ``cm-<class>-*`` (:mod:`client.disclosure`).

        Patients, not slices: the floor is a number of patients, and a patient
        with several slices of a class is one of the people its recall
        describes. A patient with slices of two classes counts in both. Kept at
        the site; no key of the wire carries it.
        """
        val: SliceDataset = data.validation
        labels = val.labels.tolist()
        classes = [{labels[j] for j in group} for group in val.patients]
        return {
            class_denominator(name): sum(i in seen for seen in classes)
            for i, name in enumerate(plan.class_names)
        }

    @torch.no_grad()
    def predict(
        self,
        model: nn.Module,
        image: Path,
        plan: Plan,
        device: torch.device,
        output: Path | None = None,
    ) -> dict[str, Any]:
        """Class and probabilities of one image; with ``output``, also a
        saliency map.

        ``output`` is a ``.json`` file, or a folder that gets ``<image
        name>.json``. Beside the JSON goes ``<image name>_saliency.png``: the
        slice as the model saw it with the predicted class's occlusion
        sensitivity over it (:mod:`client.tasks.classification.saliency`); the
        summary names it under ``saliency`` and the method under
        ``saliency-method``. The map is computed after the probabilities, from
        forward passes without gradients: the class and probabilities are the
        same with or without it, and the model's ``requires_grad`` flags are
        untouched. The PNG is written before the JSON that names it, each
        atomically.
        """
        model.to(device).eval()
        x = load_slice(Path(image), plan)[None].to(device)
        prob = torch.softmax(model(x), 1)[0].cpu().tolist()
        best = max(range(len(prob)), key=prob.__getitem__)
        summary: dict[str, Any] = {
            "task": self.name,
            "image": str(image),
            "class": plan.class_names[best],
            "probabilities": dict(zip(plan.class_names, prob, strict=True)),
        }
        if output is not None:
            output = Path(output)
            stem = Path(image).name.split(".")[0]
            if output.suffix.lower() != ".json":
                output = output / f"{stem}.json"
            png = output.parent / f"{stem}_saliency.png"
            saliency.write_saliency_png(
                x[0, 0].cpu().numpy(),
                saliency.saliency_map(model, x, best),
                png,
                f"{plan.class_names[best]}  p = {prob[best]:.2f}  (occlusion)",
                # NIfTI slices are (x, y); PNG slices rows and columns
                xy_axes=not Path(image).name.lower().endswith(PNG_SUFFIXES),
            )
            summary["saliency"] = str(png)
            summary["saliency-method"] = saliency.METHOD
            atomic_write_text(output, json.dumps(summary, indent=2) + "\n")
            summary["output"] = str(output)
        return summary


def _class_weights(
    site: SiteConfig, plan: Plan, counts: list[int], sampler: bool
) -> tuple[float, ...] | None:
    """The loss's class weights by ``class-balance`` (module docstring): the
    plan's, else (without DP) inverse to the site's counts; None: unweighted."""
    if plan.class_balance not in ("loss", "sampler") or sampler:
        return None
    if plan.class_weights:
        return plan.class_weights
    if site.privacy.enabled:
        log.warning(
            "site %s: under DP the loss is not weighted by the site's class "
            "counts (other patients' labels, not covered by DP-SGD); the "
            "plan's class-weights is empty, so all classes weigh the same. "
            "Set class-weights in the plan (e.g. from public prevalence) "
            "to weight them",
            site.name,
        )
        return None
    return class_weights_from_counts(counts)
