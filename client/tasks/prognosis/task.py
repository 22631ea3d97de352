"""The prognosis task: a patient's kidney scan (and a few pre-operative
covariates) -> the outcome, as a discrete-time survival model.

A plug-in of the task seam (``client/tasks/base.py``): data, loss,
evaluation, disclosure counts, readiness check and prediction. Training,
DP-SGD, the ledger, aggregation and checkpoints are the federation's, shared
with the other tasks.

The loss is the logistic-hazard likelihood (:class:`common.survival.
LogisticHazardLoss`), a sum of per-patient terms, so DP-SGD's per-sample
clipping bounds one patient's influence; the Cox partial likelihood couples
the patients of a risk set and would not (docs/prognosis.md).

Evaluation (:func:`common.survival_metrics.survival_metrics`): Harrell's and Uno's
C-index, time-dependent AUC at the plan's horizons, the integrated Brier
score, calibration at the last horizon, and life-table counts by predicted
risk group for the coordinator's Kaplan-Meier curves. Uno's C and the Brier
score weight by the censoring distribution of the site's own training
patients, which stays at the site.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.data.check_report import DataCheck
from client.data.errors import SiteDataError
from client.data.outcome_check import check_outcomes
from client.data.outcomes import outcome_source
from client.disclosure import SURVIVAL
from client.tasks.base import TaskData
from client.tasks.prognosis.data import PatientDataset, load_prognosis_data
from client.tasks.segmentation.cases import load_site_cases
from client.tasks.segmentation.check import check_cases
from common import wire
from common.config import Plan, SiteConfig
from common.survival import (
    LogisticHazardLoss,
    km_counts,
    risk_score,
    survival_curve,
)
from common.survival_metrics import survival_metrics

log = logging.getLogger("kidneyfl.client")

EVAL_BATCH = 64


class PrognosisTask:
    """Crops around the tumour with covariates; follow-up time and event."""

    name = "prognosis"

    def load_data(self, site: SiteConfig, plan: Plan) -> TaskData:
        """The site's patients with an outcome, split by patient as for
        segmentation (the same cases train and validate).

        Raises
        ------
        SiteDataError
            No outcomes, an invalid one, or too few training patients.
        """
        data = load_prognosis_data(site, plan)
        return TaskData(
            data.train,
            data.validation,
            len(data.train),
            len(data.validation),
            data.fingerprint,
        )

    def check(self, site: SiteConfig, report: DataCheck) -> None:
        """Segmentation's check of the scans and labels (the crops come from
        them), then the outcomes: source, counts per split, invalid values,
        events against the site's floor."""
        check_cases(site, report)
        try:
            cases = load_site_cases(site)
        except SiteDataError:
            return  # check_cases has reported why
        check_outcomes(
            site,
            [c.case_id for c in cases.train],
            [c.case_id for c in cases.validation],
            site.privacy.min_cases_for_aggregates,
            report,
        )

    def loss(self, plan: Plan) -> nn.Module:
        """The logistic-hazard negative log-likelihood on the plan's edges."""
        return LogisticHazardLoss(plan.survival_edges_days)

    @torch.no_grad()
    def outputs(
        self, model: nn.Module, x: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """The model's interval logits for a stack of patients, in batches."""
        model.to(device).eval()
        parts = [
            model(x[i : i + EVAL_BATCH].to(device)).float().cpu()
            for i in range(0, len(x), EVAL_BATCH)
        ]
        return torch.cat(parts) if parts else torch.zeros((0, 0))

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        data: TaskData,
        plan: Plan,
        device: torch.device,
        **_: Any,
    ) -> dict[str, float]:
        """Survival metrics and life-table counts over the validation patients,
        and the mean validation loss."""
        val: PatientDataset = data.validation
        train: PatientDataset = data.train
        if len(val) == 0:
            return {wire.CASES_OUTCOME: 0.0, wire.CASES_EVENT: 0.0}
        logits = self.outputs(model, val.x, device)
        loss = self.loss(plan)(logits, val.y)
        curve = survival_curve(logits).numpy()
        risk = risk_score(logits).numpy()
        edges, horizons = plan.survival_edges_days, plan.survival_horizons_days
        out = survival_metrics(
            train.time, train.event, val.time, val.event, curve, risk, edges, horizons
        )
        out.update(
            {
                k: float(v)
                for k, v in km_counts(val.time, val.event, risk, edges).items()
            }
        )
        out[wire.EVAL_LOSS] = float(loss)
        return {k: float(v) for k, v in out.items()}

    def denominators(self, data: TaskData, plan: Plan) -> dict[str, int]:
        """The pseudo-count behind the scores (:data:`client.disclosure.
        SURVIVAL`): the smaller of the validation patients with an outcome and
        their events, so a score is released only when both reach the floor
        (a C-index over one event ranks that patient against the others)."""
        val: PatientDataset = data.validation
        return {SURVIVAL: int(min(len(val), int(np.sum(val.event))))}

    def predict(
        self,
        model: nn.Module,
        image: Path,
        plan: Plan,
        device: torch.device,
        output: Path | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Risk score and survival curve of one scan (JSON and a plot); the
        labels the crop needs come from ``labels`` (a file) or
        ``segmentation_model`` (a trained kidneyfl model), said in the output
        (:mod:`client.tasks.prognosis.predict`)."""
        from client.tasks.prognosis.predict import predict_prognosis

        return predict_prognosis(self, model, image, plan, device, output, **options)


def has_outcomes(site: SiteConfig) -> bool:
    """Whether the site has an outcome file (the readiness check then checks
    it as a prognosis site)."""
    return outcome_source(site) is not None
