"""Local training: plain or DP-SGD, on whatever device the site has.

Task-agnostic: the task supplies the model, dataset and loss; this module runs
the epochs. Nothing here knows about Flower.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.privacy import make_private

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSpec:
    """DP-SGD settings for one round."""

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str


@dataclass(frozen=True)
class TrainStats:
    """Aggregates of one local training call (nothing per case)."""

    loss: float
    steps: int
    n_cases: int


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present; ``cuda`` without a GPU is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device: cuda is set in the site YAML but no CUDA GPU is visible; set "
            "device: auto or cpu, or fix the GPU driver"
        )
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def local_train(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: nn.Module,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str,
    device: torch.device,
    seed: int,
    dp: DPSpec | None = None,
) -> TrainStats:
    """Train ``model`` in place for ``epochs`` epochs; returns aggregate stats.

    With ``dp`` set, Opacus DP-SGD runs with Poisson sampling: each step's batch
    size is random, possibly zero. An empty batch still takes an optimiser step
    (noise only) so that the steps run equal the steps accounted for.
    """
    torch.manual_seed(seed)
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)
    opt = _optimizer(optimizer, model.parameters(), learning_rate)
    net = model
    if dp is not None:
        net, opt, loader = make_private(
            model,
            opt,
            loader,
            dp.noise_multiplier,
            dp.max_grad_norm,
            dp.grad_sample_mode,
        )
    try:
        total, batches, steps = _epochs(net, opt, loader, loss_fn, epochs, device)
    finally:
        if net is not model:
            net.remove_hooks()  # leave ``model`` a plain module, trained in place
    mean_loss = total / batches if batches else math.nan
    return TrainStats(loss=mean_loss, steps=steps, n_cases=len(dataset))


def _epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loader: DataLoader,
    loss_fn: nn.Module,
    epochs: int,
    device: torch.device,
) -> tuple[float, int, int]:
    total, batches, steps = 0.0, 0, 0
    for _ in range(epochs):
        for images, labels in loader:
            opt.zero_grad(set_to_none=True)
            if images.shape[0] == 0:
                _empty_step(model)
            else:
                loss = loss_fn(model(images.to(device)), labels.to(device))
                loss.backward()
                total += float(loss.detach())
                batches += 1
            opt.step()
            steps += 1
    return total, batches, steps


def _empty_step(model: nn.Module) -> None:
    # functorch-mode backward fails on a batch of 0; give every parameter an
    # empty per-sample gradient so Opacus clips nothing and adds only noise.
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
