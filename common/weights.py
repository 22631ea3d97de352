"""The one serialisation path for model state: state_dict in, state_dict out.

Buffers travel with parameters, Opacus' ``_module.`` prefix is removed, and
non-finite values are refused before anything leaves a site.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

OPACUS_PREFIX = "_module."


class NonFiniteWeightsError(ValueError):
    """A model state holds NaN or Inf and must not be sent or aggregated."""


def export_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Detached CPU copy of the full state (parameters and buffers).

    Raises
    ------
    NonFiniteWeightsError
        Naming the first tensor with NaN or Inf.
    """
    state = OrderedDict()
    for key, value in model.state_dict().items():
        key = key.removeprefix(OPACUS_PREFIX)
        state[key] = value.detach().to("cpu", copy=True).contiguous()
    check_finite(state)
    return state


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """Raise if any floating tensor in ``state`` has NaN or Inf."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteWeightsError(
                f"tensor {key!r} has NaN or Inf values; training diverged (lower the "
                "learning rate or the DP clipping norm)"
            )


def import_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` strictly (every key, every shape)."""
    target = model._module if hasattr(model, "_module") else model
    target.load_state_dict(OrderedDict(state), strict=True)
