"""What both sides need to know about a task: its network's output size and
the metrics a report leads with.

Everything else a task owns (data, loss, metrics, prediction) lives in the
site's task plug-in (``client/tasks/base.py``); the federation code never branches on
the task.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common import wire
from common.config import Plan
from common.metrics import KITS_REGIONS
from common.models import NUM_SEG_CLASSES, build_model, get_model_spec

# Number of network outputs for a plan, per task.
TASK_OUTPUTS: dict[str, Callable[[Plan], int]] = {
    "segmentation": lambda plan: NUM_SEG_CLASSES,
    "classification": lambda plan: len(plan.class_names),
    "prognosis": lambda plan: len(plan.survival_edges_days),
}

# The evaluation metrics a report leads with, per task (round line, summary).
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": tuple(wire.dice_key(r) for r in KITS_REGIONS),
    "classification": (wire.BALANCED_ACCURACY, wire.ACCURACY, wire.AUC_MACRO),
    "prognosis": (wire.C_HARRELL, wire.C_UNO, wire.IBS),
}


def build_plan_model(plan: Plan) -> nn.Module:
    """The plan's network, identically initialised on every side.

    Raises
    ------
    ValueError
        If the model is registered for another task.
    """
    spec = get_model_spec(plan.model)
    if spec.task != plan.task:
        raise ValueError(
            f"model {plan.model!r} is a {spec.task} network but the plan's task is "
            f"{plan.task!r}; choose a {plan.task} model"
        )
    return build_model(plan.model, 1, TASK_OUTPUTS[plan.task](plan), seed=plan.seed)
