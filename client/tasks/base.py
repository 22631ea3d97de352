"""The task seam: a task is a plug-in of data, loss, metrics, prediction and
the data part of the readiness check.

The ClientApp and ``kidneyfl site check`` call only this interface, so adding a
task means adding one package under ``client/tasks/`` and one entry in
:mod:`client.tasks.registry`. Tasks import this module, never the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from client.data.check_report import DataCheck
from common.config import Plan, SiteConfig


@dataclass
class TaskData:
    """A site's prepared data. ``fingerprint`` identifies the training set."""

    train: Dataset
    validation: Any
    n_train: int
    n_val: int
    fingerprint: str
    # subgroup ("<attribute>-<value>") -> indices of its validation cases
    # (client/data/subgroups.py); stays at the site
    groups: dict[str, list[int]] = field(default_factory=dict)


class Task(Protocol):
    """What a task must provide to be trained federatedly."""

    name: str

    def load_data(self, site: SiteConfig, plan: Plan) -> TaskData: ...

    def check(self, site: SiteConfig, report: DataCheck) -> None:
        """Fill the data part of ``kidneyfl site check``: cases found, usable,
        unlabelled, with errors (an ERROR finding per broken file, naming it
        and the fix), per class and split, and the patient rules' problems.
        Raises ``SiteDataError`` only when the data cannot be read at all."""
        ...

    def loss(self, plan: Plan) -> nn.Module: ...

    def evaluate(
        self, model: nn.Module, data: TaskData, plan: Plan, device: torch.device
    ) -> dict[str, float]: ...

    def predict(
        self,
        model: nn.Module,
        image: Path,
        plan: Plan,
        device: torch.device,
        output: Path | None,
    ) -> dict[str, Any]:
        """Apply a trained model to one scan (``kidneyfl predict``).

        Applies the plan's preprocessing, writes ``output`` when the task
        produces a file (a label map for segmentation) and returns a JSON-able
        summary (volumes, class probabilities, ...).
        """
        ...
