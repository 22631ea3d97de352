"""The task seam: a task is a plug-in of data, loss and metrics.

The ClientApp calls only this interface, so adding a task means adding one
module and one registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from common.config import Plan, SiteConfig


@dataclass
class TaskData:
    """A site's prepared data. ``fingerprint`` identifies the training set."""

    train: Dataset
    validation: Any
    n_train: int
    n_val: int
    fingerprint: str


class Task(Protocol):
    """What a task must provide to be trained federatedly."""

    name: str

    def load_data(self, site: SiteConfig, plan: Plan) -> TaskData: ...

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


def get_task(name: str) -> Task:
    """The site-side plug-in for a task name."""
    from client.tasks.classification.task import ClassificationTask
    from client.tasks.segmentation.task import SegmentationTask

    tasks: dict[str, Task] = {
        "segmentation": SegmentationTask(),
        "classification": ClassificationTask(),
    }
    try:
        return tasks[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(tasks)}") from None
