"""The learning rate of each global round (``lr-schedule``), sent by the coordinator.

``constant`` (the default) sends nothing and every site trains with the plan's
``learning-rate``. ``cosine`` anneals it over the run's global rounds, from
``learning-rate`` in round 1 to ``learning-rate x lr-min-factor`` in round
``num-server-rounds``: the closed form of torch's ``CosineAnnealingLR`` with
one step per round. The round counts across resumes, so a resumed run sends
the rate of the global round it is in.

A site's privacy accounting does not depend on the rate: epsilon follows from
the noise multiplier, the sampling rate and the number of steps; the rate only
scales the clipped, noised gradient after the mechanism (post-processing).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from common.config import Plan


def round_learning_rate(plan: Plan, global_round: int) -> float:
    """The learning rate of ``global_round`` (1-based) under ``plan``'s schedule."""
    base = plan.learning_rate
    if plan.lr_schedule == "constant":
        return base
    last = plan.num_server_rounds
    if last == 1:
        return base
    low = base * plan.lr_min_factor
    t = min(max(global_round - 1, 0), last - 1)  # never past either end
    w = (1 + math.cos(math.pi * t / (last - 1))) / 2  # 1 in round 1, 0 in the last
    return w * base + (1 - w) * low  # both ends exact


def learning_rates(plan: Plan) -> Callable[[int], float] | None:
    """The per-round rate the coordinator sends, or ``None`` when it sends none
    (the constant schedule: sites read the plan's ``learning-rate``)."""
    if plan.lr_schedule == "constant":
        return None
    return lambda global_round: round_learning_rate(plan, global_round)
