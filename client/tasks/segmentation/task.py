"""The segmentation task: kidney, tumour and cyst in 3D CT (KiTS labels)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from client.data.check_report import DataCheck
from client.data.errors import SiteDataError
from client.data.layouts import LAYOUTS
from client.data.subgroups import group_indices, read_subgroups
from client.tasks.base import TaskData
from client.tasks.segmentation.cases import load_site_cases
from client.tasks.segmentation.check import check_cases
from client.tasks.segmentation.pipeline import (
    IMAGE,
    LABEL,
    PatchDataset,
    volume_dataset,
)
from client.tasks.segmentation.predict import predict_scan
from common import wire
from common.config import Plan, SiteConfig
from common.lesions import case_lesions, summarise_lesions
from common.metrics import (
    case_rows,
    present_mean,
    region_masks,
    region_surface_dice,
    summarise_cases,
)
from common.postprocess import (
    CANDIDATES,
    CHOICE_KEYS,
    apply_rule,
    apply_rules,
    candidate_key,
)

log = logging.getLogger("kidneyfl.client")

# What each subgroup reports (wire.SUBGROUP_KEY): Dice and its mean square
# (for a confidence interval at the coordinator) and case counts for kidney and
# tumour; the tumour false-positive rate and lesion sensitivity.
SUBGROUP_REGIONS = ("kidney", "tumour")


def subgroup_metrics(
    groups: dict[str, list[int]], rows: list[dict], lesions: list[dict]
) -> dict[str, float]:
    """``sg-<attribute>-<value>-<key>`` for every subgroup of the validation
    cases (``rows``, ``lesions``: per case, in validation order)."""
    out: dict[str, float] = {}
    for group, idx in sorted(groups.items()):
        summary = summarise_cases(rows[i] for i in idx)
        summary.update(summarise_lesions(lesions[i] for i in idx))
        prefix = f"sg-{group}-"
        for region in SUBGROUP_REGIONS:
            present = [rows[i][region][0] for i in idx if rows[i][region][1]]
            out[f"{prefix}cases-{region}"] = float(len(present))
            if present:
                out[f"{prefix}dice-{region}"] = summary[f"dice-{region}"]
                out[f"{prefix}dice2-{region}"] = sum(d * d for d in present) / len(
                    present
                )
        out[f"{prefix}cases-no-tumour"] = summary.get("cases-no-tumour", 0.0)
        for key in ("fp-rate-tumour", "lesion-sens-tumour"):
            if key in summary:
                out[prefix + key] = summary[key]
    return out


class _CaseMeasures:
    """One validation case's per-case rows and lesions of a predicted label
    map, measured once per distinct map.

    Most post-processing candidates leave a case as it was, or as another
    candidate left it; their maps are equal and so are their measures, so
    each distinct map is measured once (compared by content: a digest, then
    the whole array).
    """

    def __init__(
        self, label: torch.Tensor, truth: np.ndarray, probs: dict, plan: Plan
    ) -> None:
        self.label, self.truth, self.probs, self.plan = label, truth, probs, plan
        self._seen: dict[bytes, list[tuple[np.ndarray, tuple[list, Any]]]] = {}

    def __call__(self, labels: np.ndarray) -> tuple[list, Any]:
        key = hashlib.blake2b(labels.tobytes(), digest_size=16).digest()
        for seen, result in self._seen.get(key, []):
            if np.array_equal(seen, labels):
                return result
        pred = torch.from_numpy(labels.astype(np.int64))[None, None]
        result = (
            case_rows(pred, self.label, self.plan.spacing_mm),
            case_lesions(labels, self.truth, self.probs),
        )
        self._seen.setdefault(key, []).append((labels, result))
        return result


def lesion_probs(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Each lesion region's probability map, from softmax ``(C, *spatial)``."""
    return {"tumour": probs[2], "cyst": probs[3]}


class SegmentationTask:
    """Random foreground-weighted patches to train; whole volumes to validate."""

    name = "segmentation"
    layouts = LAYOUTS[1:]

    def check(self, site: SiteConfig, report: DataCheck) -> None:
        """The readiness check's data part: every case inspected (HU range,
        spacing, labels against the layout's map), the split by patient."""
        check_cases(site, report)

    def load_data(self, site: SiteConfig, plan: Plan) -> TaskData:
        """Discover, split and cache the site's cases."""
        cases = load_site_cases(site)
        lm = cases.label_map
        train = PatchDataset(volume_dataset(cases.train, site, plan, lm), plan)
        val = volume_dataset(cases.validation, site, plan, lm)
        try:
            attributes = read_subgroups(site.data.root)
        except SiteDataError as err:  # groups are a report, never a reason to stop
            log.warning("subgroups ignored: %s", err)
            attributes = {}
        groups = group_indices([c.case_id for c in cases.validation], attributes)
        return TaskData(
            train,
            val,
            len(cases.train),
            len(cases.validation),
            cases.fingerprint(),
            groups,
        )

    def loss(self, plan: Plan) -> nn.Module:
        """Dice + cross-entropy, computed per sample then averaged over the batch.

        ``batch=False`` matters for DP: a batch-pooled Dice would couple samples,
        and per-sample gradients would no longer be per patient.
        """
        return DiceCELoss(
            to_onehot_y=True, softmax=True, include_background=False, batch=False
        )

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        data: TaskData,
        plan: Plan,
        device: torch.device,
        candidates: bool = False,
        postprocess: str = "none",
    ) -> dict[str, float]:
        """Dice and surface Dice per region, KiTS-style, lesion-level detection,
        and the mean loss over the validation volumes (whole volumes,
        sliding-window inference).

        A region's Dice and surface Dice are means over the cases whose
        reference contains it; the other cases give its false-positive rate
        and mean predicted volume (``common.metrics.summarise_cases``). Lesions
        (tumour, cyst) are connected components (``common.lesions``): per-lesion
        sensitivity, false-positive lesions per case, case-level detection and
        its AUC, and an FROC summary. Surface distances are measured on the
        evaluated grid, the plan's ``spacing-mm`` (after the federated
        preprocessing plan, if any).

        Parameters
        ----------
        candidates : bool
            Also evaluate every post-processing candidate
            (``common.postprocess.CANDIDATES``) on the same predictions:
            ``pp<i>-<key>`` for each of ``CHOICE_KEYS`` (the post-run
            clinical calibration, ``server/clinical_round.py``).
        postprocess : str
            The rule applied before every metric (the run's chosen rule).
        """
        model.to(device).eval()
        loss_fn = self.loss(plan)
        rows, nsd_rows, present, losses, lesions = [], [], [], [], []
        cand: list[tuple[list, list]] = [([], []) for _ in CANDIDATES]
        for i in range(len(data.validation)):
            item = data.validation[i]
            image = item[IMAGE].unsqueeze(0).to(device)
            label = item[LABEL].unsqueeze(0).long().to(device)
            logits = sliding_window_inference(
                image, plan.patch_size, sw_batch_size=16, predictor=model, overlap=0.25
            )
            losses.append(float(loss_fn(logits, label)))
            probs = torch.softmax(logits.float(), 1)[0].cpu().numpy()
            truth = label[0, 0].cpu().numpy()
            raw = probs.argmax(0).astype(np.uint8)
            labels = apply_rule(raw, probs, plan.spacing_mm, postprocess)
            pred = torch.from_numpy(labels.astype(np.int64))[None, None]
            measured = _CaseMeasures(label.cpu(), truth, lesion_probs(probs), plan)
            case, case_les = measured(labels)
            rows += case
            lesions.append(case_les)
            nsd_rows.append(
                region_surface_dice(
                    pred, label.cpu(), plan.spacing_mm, plan.surface_dice_tolerance_mm
                )
            )
            present.append(region_masks(label.cpu()).flatten(2).sum(-1) > 0)
            if candidates:
                maps = apply_rules(raw, probs, plan.spacing_mm, CANDIDATES)
                for (c_rows, c_lesions), c_lab in zip(cand, maps, strict=True):
                    case, case_les = measured(c_lab)
                    c_rows += case
                    c_lesions.append(case_les)
        out = summarise_cases(rows)
        out.update(summarise_lesions(lesions))
        if nsd_rows:
            nsd = present_mean(torch.cat(nsd_rows), torch.cat(present))
            for k, v in nsd.items():
                out[wire.surface_dice_key(k)] = v
        out[wire.EVAL_LOSS] = sum(losses) / len(losses) if losses else float("nan")
        out.update(subgroup_metrics(data.groups, rows, lesions))
        for index, (c_rows, c_lesions) in enumerate(cand if candidates else []):
            summary = summarise_cases(c_rows) | summarise_lesions(c_lesions)
            for key in CHOICE_KEYS:
                if key in summary:
                    out[candidate_key(index, key)] = summary[key]
        return out

    def denominators(self, data: TaskData, plan: Plan) -> dict[str, int]:
        """Counts behind the metrics that the metrics do not carry: none.

        Every segmentation denominator is on the reply already (``cases-X``,
        ``cases-no-X``: one case per patient), so :mod:`client.disclosure`
        reads them from :meth:`evaluate`'s metrics.
        """
        return {}

    def predict(
        self,
        model: nn.Module,
        image: Path,
        plan: Plan,
        device: torch.device,
        output: Path | None,
        postprocess: str = "none",
    ) -> dict[str, Any]:
        """Label map in the scan's own grid (written to ``output``) with its
        uncertainty map and summary image, the volumes of kidney, tumour and
        cyst in mL, each lesion with its confidence, and each tumour's
        measures for surgical planning; ``postprocess`` is the rule the
        federation chose (the model's sidecar)."""
        return predict_scan(model, image, plan, device, output, postprocess=postprocess)
