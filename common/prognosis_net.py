"""Prognosis networks: a patient's scan crop and covariates -> one logit per
interval of the discrete-time hazard model (``common/survival.py``).

The input is one tensor per patient, the covariates followed by the
flattened crop (``client/tasks/prognosis/data.py``), so Opacus sees a single
input with the batch first. Both networks are Opacus-safe as built: GroupNorm,
out-of-place activations, no BatchNorm.

- ``prognosis-cnn``: a small 3D CNN over the crop (three stride-2
  convolutions of 8, 16, 32 channels, global average pooling), its 32
  features beside the covariates, then a two-layer head.

The head's output bias starts at -2 (a hazard of 0.12 an interval), not 0
(0.5 an interval, which predicts nearly everyone dead within two intervals).
- ``prognosis-linear``: the covariates only (clinical, and the tumour's
  first-order radiomics when the plan uses them), one linear layer (a
  discrete-time proportional-odds model); the baseline the CNN must beat.
"""

from __future__ import annotations

import torch
from torch import nn

N_COVARIATES = 6  # client/tasks/prognosis/data.py N_COVARIATES
IMAGE_CHANNELS = 2


class PrognosisNet(nn.Module):
    """Covariates (and, with ``widths``, a 3D CNN over the crop) -> logits."""

    def __init__(
        self, n_intervals: int, widths: tuple[int, ...] = (8, 16, 32), hidden: int = 16
    ) -> None:
        super().__init__()
        self.n_covariates = N_COVARIATES
        self.image_channels = IMAGE_CHANNELS
        self.encoder: nn.Module | None = None
        features = N_COVARIATES
        if widths:
            layers: list[nn.Module] = []
            prev = IMAGE_CHANNELS
            for w in widths:
                layers += [
                    nn.Conv3d(prev, w, 3, stride=2, padding=1),
                    nn.GroupNorm(min(4, w), w),
                    nn.ReLU(),
                ]
                prev = w
            layers += [nn.AdaptiveAvgPool3d(1), nn.Flatten()]
            self.encoder = nn.Sequential(*layers)
            features += prev
            self.head: nn.Module = nn.Sequential(
                nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, n_intervals)
            )
        else:
            self.head = nn.Linear(features, n_intervals)
        last = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        nn.init.constant_(last.bias, -2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # attributes, not globals: TorchScript (``kidneyfl export``) scripts this
        n_cov, channels = self.n_covariates, self.image_channels
        covs = x[:, :n_cov]
        encoder = self.encoder
        if encoder is None:
            return self.head(covs)
        voxels = (x.shape[1] - n_cov) // channels
        side = int(round(voxels ** (1.0 / 3.0)))
        if side * side * side != voxels:
            raise ValueError("input is not the covariates and cubic image channels")
        img = x[:, n_cov:].reshape(x.shape[0], channels, side, side, side)
        return self.head(torch.cat([covs, encoder(img)], 1))


def build_cnn(in_channels: int, out_channels: int) -> nn.Module:
    """``prognosis-cnn`` (``in_channels`` is the task's own, fixed)."""
    return PrognosisNet(out_channels)


def build_linear(in_channels: int, out_channels: int) -> nn.Module:
    """``prognosis-linear``: covariates only."""
    return PrognosisNet(out_channels, widths=())
