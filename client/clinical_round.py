"""The site's part of the post-run clinical calibration (issue 28).

After the last round the coordinator sends the final model twice more as
``evaluate`` requests with ``clinical-stage`` (``server/clinical_round.py``):

1. **Post-processing candidates and the OOD reference.** The site evaluates
   every candidate rule (``common.postprocess.CANDIDATES``) on its validation
   patients (``pp<i>-<key>`` metrics, each under the floor of its own
   denominator, as every validation metric: :mod:`client.disclosure`), and
   sums the out-of-distribution features (``common.ood``: spacing, field of
   view, body intensities, the model's predicted volumes) over up to
   :data:`MAX_REFERENCE_CASES` of its training patients: ``ood-n``,
   ``ood-sum``, ``ood-sumsq``. Those sums are dataset statistics like the
   fingerprint's, so they follow the fingerprint's rule: sent only when the
   site shares its fingerprint (``privacy.share_fingerprint``) and at least
   its floor of patients stand behind them.
2. **The threshold's calibration.** Given the pooled reference (mean and
   standard deviation per feature, checked by :mod:`client.request_guard`),
   the site scores each of its validation patients (held out from training
   and from the reference) and sends the share above each threshold
   (``ood-exceed``): shares over its validation patients, sent only when the
   site shares validation metrics and has at least its floor of them.

Every reply also says whether the site's data are synthetic
(``data-synthetic``), for the final model's provenance. Flower-free.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from client.prepare import Round
from client.request_guard import run_key
from client.request_refused import RequestRefused
from client.scan_check import ras_view
from client.tasks.segmentation.cases import load_site_cases
from client.tasks.segmentation.pipeline import IMAGE, volume_dataset
from common import wire
from common.atomic import atomic_write_json
from common.ood import FEATURES, exceedance, feature_sums, ood_score, scan_features

log = logging.getLogger("kidneyfl.client")

# Training patients whose features make the site's part of the reference: the
# first ones of the site's own split order (inference on each costs a volume).
MAX_REFERENCE_CASES = 32


@torch.no_grad()
def case_features(r: Round, cases: list, label_map: Any) -> list[np.ndarray]:
    """The OOD features of each case: its raw scan's geometry and intensities,
    and the final model's predicted volumes on the preprocessed volume."""
    volumes = volume_dataset(cases, r.site, r.plan, label_map)
    voxel_ml = float(np.prod(r.plan.spacing_mm)) / 1000.0
    r.model.to(r.device).eval()
    rows = []
    for i, case in enumerate(cases):
        image = volumes[i][IMAGE].unsqueeze(0).to(r.device)
        logits = sliding_window_inference(
            image, r.plan.patch_size, sw_batch_size=16, predictor=r.model, overlap=0.25
        )
        counts = np.bincount(logits.argmax(1).cpu().numpy().ravel(), minlength=4)
        predicted = {
            name: float(counts[v]) * voxel_ml
            for v, name in ((1, "kidney"), (2, "tumour"), (3, "cyst"))
        }
        raw = nib.load(str(case.image))
        hu, zooms = ras_view(raw, np.asarray(raw.dataobj, dtype=np.float32))
        rows.append(scan_features(hu, zooms, predicted))
    return rows


def reference_sums(r: Round, floor: int) -> dict[str, Any]:
    """Stage 1's OOD sums over the site's training patients, or nothing."""
    if not r.site.privacy.share_fingerprint:
        log.info("OOD reference sums withheld (privacy.share_fingerprint is off)")
        return {}
    cases = load_site_cases(r.site)
    train = cases.train[:MAX_REFERENCE_CASES]
    if len(train) < floor:
        log.info(
            "OOD reference sums withheld: %d training cases, floor %d",
            len(train),
            floor,
        )
        return {}
    sums = feature_sums(case_features(r, train, cases.label_map))
    return {
        wire.OOD_N: int(sums["n"]),
        wire.OOD_SUM: [float(v) for v in sums["sum"]],
        wire.OOD_SUMSQ: [float(v) for v in sums["sumsq"]],
    }


def calibration_shares(r: Round, floor: int) -> dict[str, Any]:
    """Stage 2: the share of validation patients above each OOD threshold."""
    cases = load_site_cases(r.site)
    n_val = len(cases.validation)
    if not r.site.privacy.share_validation_metrics or n_val < floor:
        log.info(
            "OOD calibration withheld (%d validation cases, floor %d)", n_val, floor
        )
        return {wire.METRICS_WITHHELD: 1}
    assert r.checked.ood_mean is not None and r.checked.ood_std is not None
    reference = {
        "features": list(FEATURES),
        "mean": list(r.checked.ood_mean),
        "std": list(r.checked.ood_std),
    }
    rows = case_features(r, cases.validation, cases.label_map)
    scores = [ood_score(row, reference) for row in rows]
    return {wire.OOD_EXCEED: [float(v) for v in exceedance(scores)]}


ANSWERED_FILE = "clinical-answered.json"


def answer_once(r: Round) -> None:
    """Each clinical stage is answered once per run, recorded before any work.

    Repeating stage 2 with other references would turn the shares into a
    probe of single features; repeating stage 1 releases nothing new. The
    record is keyed by the run id's hash (``request_guard.run_key``).

    Raises
    ------
    RequestRefused
        ``query-limit`` for a stage this run was already answered.
    """
    path = Path(r.site.state_dir) / ANSWERED_FILE
    try:
        done = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        raise RequestRefused(
            "query-limit", f"{path} is unreadable; the site answers no calibration"
        ) from None
    key, stage = run_key(r.run_id), r.checked.clinical_stage
    if stage in done.get(key, []):
        raise RequestRefused(
            "query-limit",
            f"run {r.run_id!r} already had its clinical stage {stage} answered",
        )
    done.setdefault(key, []).append(stage)
    atomic_write_json(path, done)


def clinical_values(
    r: Round, floor: int, candidate_metrics: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The reply's metrics for a ``clinical-stage`` evaluate request.

    Parameters
    ----------
    floor : int
        The site's floor for this request (``evaluate_round.aggregate_floor``).
    candidate_metrics : callable
        The validation metrics with every post-processing candidate, under the
        site's release rule (``evaluate_round.validation_metrics``).
    """
    if r.plan.task != "segmentation":
        raise RequestRefused(
            "request-invalid", "the clinical calibration is for segmentation only"
        )
    answer_once(r)
    values: dict[str, Any] = {}
    if r.checked.clinical_stage == 1:
        values.update(candidate_metrics())
        values.update(reference_sums(r, floor))
    else:
        values[wire.NUM_VAL_CASES] = r.data.n_val
        values.update(calibration_shares(r, floor))
    return values
