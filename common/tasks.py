"""What both sides need to know about a task: its network's output size.

Everything else a task owns (data, loss, metrics, prediction) lives in the
site's task plug-in (``client/task.py``); the federation code never branches on
the task.
"""

from __future__ import annotations

from torch import nn

from common.config import Plan
from common.models import NUM_SEG_CLASSES, build_model, get_model_spec

TASK_OUTPUTS: dict[str, int] = {"segmentation": NUM_SEG_CLASSES}


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
    return build_model(plan.model, 1, TASK_OUTPUTS[plan.task], seed=plan.seed)
