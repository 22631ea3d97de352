"""Local training: plain or DP-SGD, on whatever device the site has.

Task-agnostic: the task supplies the model, dataset and loss; this module runs
the epochs. Nothing here knows about Flower.

FedProx under DP-SGD. The proximal term ``mu/2 ||w - w_global||^2`` has the
gradient ``mu (w - w_global)``, which depends on no training sample. It is
therefore *not* put into the loss (Opacus would compute it per sample, clip it
with the data gradient and so distort both), but added to ``p.grad`` after the
DP optimiser has clipped, noised and averaged the data gradient and before the
parameter update. A data-independent function of an already privatised gradient
is post-processing, so the DP guarantee and the ledger's accounting are
unchanged. Without DP the same code path gives exactly the gradient of
``loss + mu/2 ||w - w_global||^2``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.privacy.dpsgd import DPSpec, make_private
from common.config import SGD_MOMENTUM

log = logging.getLogger(__name__)


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
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    return torch.optim.Adam(params, lr=lr)


class Multiplicity(Dataset):
    """``k`` independent draws of one patient's item, stacked: ``(k, ...)``.

    Augmentation multiplicity (De et al. 2022): a drawn patient contributes
    ``k`` random patches (or augmentations) to a step, and under DP their
    per-sample gradients are averaged *before* clipping, so the clipped unit is
    still the patient while each clipped gradient carries more signal. The
    item's randomness comes from the wrapped dataset (its crops).
    """

    def __init__(self, dataset: Dataset, k: int) -> None:
        if k < 1:
            raise ValueError("augmentation multiplicity must be at least 1")
        self.dataset, self.k = dataset, k

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        draws = [self.dataset[index] for _ in range(self.k)]
        return (
            torch.stack([torch.as_tensor(x) for x, _ in draws]),
            torch.stack([torch.as_tensor(y) for _, y in draws]),
        )


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
    proximal_mu: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
    max_steps: int | None = None,
    multiplicity: int = 1,
    trainable: str = "all",
    on_step: Callable[[int, float], None] | None = None,
) -> TrainStats:
    """Train ``model`` in place for ``epochs`` epochs; returns aggregate stats.

    With ``dp`` set, Opacus DP-SGD runs with Poisson sampling: each step's batch
    size is random, possibly zero. An empty batch still takes an optimiser step
    (noise only) so that the steps run equal the steps accounted for.

    Parameters
    ----------
    proximal_mu : float
        FedProx: add ``proximal_mu * (w - anchor)`` to every parameter's
        (privatised) gradient, see the module docstring.
    anchor : dict, optional
        The global weights by parameter name; default: the weights at entry.
    max_steps : int, optional
        Stop after this many optimiser steps (fine-tuning); ``epochs`` is then
        an upper bound.
    multiplicity : int
        Augmentation multiplicity: patches per drawn patient and step, their
        per-sample gradients averaged before clipping (:class:`Multiplicity`).
        The accounting does not change: the patient is still the sampled and
        clipped unit.
    trainable : str
        ``all``, ``biases`` or ``norms-biases`` (:func:`trainable_names`): the
        others are frozen for this call (no gradient, no noise, unchanged).
    on_step : callable, optional
        Called after every optimiser step with the steps taken so far and that
        step's loss (NaN for an empty Poisson batch): a progress display. It
        sees nothing per patient.
    """
    torch.manual_seed(seed)
    model.to(device).train()
    with _trains_only(model, trainable):
        prox = _proximal_pairs(model, proximal_mu, anchor, device)
        gen = torch.Generator().manual_seed(seed)
        if multiplicity > 1:
            dataset = Multiplicity(dataset, multiplicity)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _optimizer(optimizer, params, learning_rate)
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
            total, batches, steps = _epochs(
                net,
                opt,
                loader,
                loss_fn,
                epochs,
                device,
                prox,
                proximal_mu,
                max_steps,
                multiplicity,
                on_step,
            )
        finally:
            if net is not model:
                net.remove_hooks()  # leave ``model`` a plain module, trained in place
        mean_loss = total / batches if batches else math.nan
        return TrainStats(loss=mean_loss, steps=steps, n_cases=len(dataset))


def trainable_names(model: nn.Module, which: str) -> set[str]:
    """Names of the parameters ``which`` trains: ``all``; ``biases`` (every
    parameter named ``bias``); ``norms-biases`` (also the norm layers' own
    parameters).

    Raises
    ------
    ValueError
        Unknown ``which``, or one that leaves nothing to train in this model.
    """
    names = {n for n, _ in model.named_parameters()}
    if which == "all":
        return names
    if which not in ("biases", "norms-biases"):
        raise ValueError(
            f"trainable-parameters {which!r}: use all, biases, norms-biases"
        )
    keep = {n for n in names if n.rsplit(".", 1)[-1] == "bias"}
    if which == "norms-biases":
        norms = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
        for mod_name, mod in model.named_modules():
            if isinstance(mod, norms):
                prefix = f"{mod_name}." if mod_name else ""
                keep |= {prefix + n for n, _ in mod.named_parameters(recurse=False)}
    if not keep:
        raise ValueError(
            f"trainable-parameters {which}: this model has no such parameters; "
            "use all, or a model with biases or affine norm layers"
        )
    return keep


@contextlib.contextmanager
def _trains_only(model: nn.Module, which: str) -> Iterator[None]:
    """Freeze the parameters ``which`` leaves out, for the ``with`` block."""
    keep = trainable_names(model, which)
    frozen = [p for n, p in model.named_parameters() if n not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loader: DataLoader,
    loss_fn: nn.Module,
    epochs: int,
    device: torch.device,
    prox: list[tuple[nn.Parameter, torch.Tensor]] | None = None,
    mu: float = 0.0,
    max_steps: int | None = None,
    multiplicity: int = 1,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[float, int, int]:
    # With ``max_steps`` the loop runs exactly that many optimiser steps, the
    # steps the ledger recorded before training: Opacus' Poisson sampler runs
    # int(1 / sample_rate) batches an epoch, which floating point makes one
    # fewer than the schedule's ceil(n / batch) for some n (93, 99, 105, ...),
    # so epochs alone could run fewer steps than were accounted.
    total, batches, steps, epoch = 0.0, 0, 0, 0
    while epoch < epochs or (max_steps is not None and steps < max_steps):
        epoch += 1
        before = steps
        for images, labels in loader:
            if max_steps is not None and steps >= max_steps:
                return total, batches, steps
            opt.zero_grad(set_to_none=True)
            step_loss = math.nan
            if images.shape[0] == 0:
                _empty_step(model)
            else:
                if multiplicity > 1:  # (patients, k, ...) -> (patients x k, ...)
                    images, labels = images.flatten(0, 1), labels.flatten(0, 1)
                loss = loss_fn(model(images.to(device)), labels.to(device))
                loss.backward()
                if multiplicity > 1 and isinstance(opt, DPOptimizer):
                    _average_per_patient(model, multiplicity)
                step_loss = float(loss.detach())
                total += step_loss
                batches += 1
            _step(opt, prox or [], mu)
            steps += 1
            if on_step is not None:
                on_step(steps, step_loss)
        if steps == before:  # an empty loader: nothing more will run
            break
    return total, batches, steps


def _proximal_pairs(
    model: nn.Module,
    mu: float,
    anchor: dict[str, torch.Tensor] | None,
    device: torch.device,
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    if mu <= 0:
        return []
    pairs = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ref = anchor[name] if anchor is not None else p.detach()
        pairs.append((p, ref.detach().to(device, copy=True)))
    return pairs


def _add_proximal(prox: list[tuple[nn.Parameter, torch.Tensor]], mu: float) -> None:
    with torch.no_grad():
        for p, ref in prox:
            term = mu * (p.detach() - ref)
            if p.grad is None:
                p.grad = term
            else:
                p.grad.add_(term)


def _step(
    opt: torch.optim.Optimizer,
    prox: list[tuple[nn.Parameter, torch.Tensor]],
    mu: float,
) -> None:
    if not prox:
        opt.step()
    elif isinstance(opt, DPOptimizer):
        # clip, noise and average first; then the data-independent proximal
        # gradient (post-processing), then the update
        if opt.pre_step():
            _add_proximal(prox, mu)
            opt.original_optimizer.step()
    else:
        _add_proximal(prox, mu)
        opt.step()


def _average_per_patient(model: nn.Module, k: int) -> None:
    # Opacus' per-sample gradients are per patch here (patients x k rows, each
    # the gradient of that patch's own loss); the mean over a patient's k rows
    # is that patient's gradient, which the optimiser then clips and noises.
    for p in model.parameters():
        grad = getattr(p, "grad_sample", None)
        if isinstance(grad, torch.Tensor):
            p.grad_sample = grad.reshape(-1, k, *grad.shape[1:]).mean(1)


def _empty_step(model: nn.Module) -> None:
    # functorch-mode backward fails on a batch of 0; give every parameter an
    # empty per-sample gradient so Opacus clips nothing and adds only noise.
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
