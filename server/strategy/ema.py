"""The coordinator's exponential moving average of the global model (``ema-decay``).

After each round's aggregate the average moves towards it,
``ema = d * ema + (1 - d) * global``, starting from the first aggregate it
sees. Training continues from the raw aggregate; evaluation, the round's
checkpoint (a second weights file) and the final model use the average.

The average is computed only from the global models the coordinator already
holds, which under DP are outputs of the sites' DP-SGD (and of central DP):
it is post-processing, so it spends no privacy and the sites' accounting does
not change. Flower-free.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

StateDict = OrderedDict[str, torch.Tensor]


class ParameterEMA:
    """An exponential moving average over a whole state dict, buffers included.

    Floating-point entries (parameters and float buffers) are averaged with
    torch's EMA update (``torch.optim.swa_utils.get_ema_multi_avg_fn``, a
    ``lerp`` by ``1 - decay``); integer buffers (such as BatchNorm's
    ``num_batches_tracked``) are copied from the newest aggregate, because an
    average of counters means nothing.

    Parameters
    ----------
    decay : float
        ``d`` in ``[0, 1)``; the plan has checked it.
    state : mapping, optional
        An average to continue (a resumed run's checkpoint); ``None`` starts
        from the next aggregate.
    """

    def __init__(
        self, decay: float, state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        self.decay = decay
        self._update = get_ema_multi_avg_fn(decay)
        self._state: StateDict | None = None
        if state is not None:
            self._state = _owned(state)

    @property
    def state(self) -> StateDict | None:
        """The average so far (``None`` before the first aggregate)."""
        return self._state

    def update(self, new: Mapping[str, torch.Tensor]) -> StateDict:
        """Move the average towards the round's aggregate ``new``; the average.

        Raises
        ------
        ValueError
            If ``new`` has other keys, shapes or dtypes than the average.
        """
        if self._state is None:
            self._state = _owned(new)
            return self._state
        _check_like(self._state, new)
        floats = [k for k, v in self._state.items() if torch.is_floating_point(v)]
        if floats:
            self._update(
                [self._state[k] for k in floats], [new[k].cpu() for k in floats], None
            )
        for k, v in self._state.items():
            if not torch.is_floating_point(v):
                v.copy_(new[k])
        return self._state


def _owned(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A detached CPU copy the average may update in place."""
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items())


def _check_like(avg: StateDict, new: Mapping[str, torch.Tensor]) -> None:
    if set(avg) != set(new):
        raise ValueError(
            "the aggregate's keys differ from the moving average's; ema-decay "
            "needs the same model in every round"
        )
    for k, v in avg.items():
        if v.shape != new[k].shape or v.dtype != new[k].dtype:
            raise ValueError(
                f"{k}: the aggregate is {tuple(new[k].shape)} {new[k].dtype}, the "
                f"moving average {tuple(v.shape)} {v.dtype}"
            )
