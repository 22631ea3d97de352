"""Audit the site's DP-SGD in one training run with white-box canaries.

Steinke, Nasr and Jagielski (NeurIPS 2023), "Privacy Auditing with One (1)
Training Run", white-box setting: ``m`` canaries, each included with probability
1/2 by a coin from the operating system's entropy (:mod:`secrets`). A canary is a
*gradient*: a Dirac of norm ``C`` (the clipping norm) on its own coordinate of
the model. Each step, every included canary is Poisson-sampled at the data's
sample rate and its gradient is appended to the per-sample gradients
(``p.grad_sample``) before the DP optimiser clips, noises and averages them: to
the mechanism it is one more patient. After training, a canary's score is the
model's movement along its coordinate, ``C (w_0 - w_T)[c]``; the auditor guesses
"in" for the top k and "out" for the bottom k and turns the number of correct
guesses into a lower bound on epsilon (:mod:`common.audit_bounds`).

Training goes through the site's own DP wiring,
:func:`client.privacy.dpsgd.make_private` (Opacus ``PrivacyEngine``, Poisson
sampling), so the audit tests what the site runs. If the bound ever exceeds the
accountant's epsilon, the noise, clipping or sampling is broken
(``tests/client/test_privacy_audit.py`` checks both directions).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.privacy.accounting import calibrate_noise, epsilon_for
from client.privacy.dpsgd import make_private, site_generator
from common.audit_bounds import GuessResult, best_guess_bound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanaryAuditResult:
    """What one audited run found, next to what the accountant claims."""

    mode: str
    canaries: int
    included: int
    steps: int
    sample_rate: float
    noise_multiplier: float  # what the mechanism was given
    accountant_noise: float  # what the accountant was told
    delta: float
    accountant_epsilon: float
    guess: GuessResult

    @property
    def epsilon_lb(self) -> float:
        """The empirical lower bound on epsilon."""
        return self.guess.epsilon_lb

    def to_dict(self) -> dict:
        """JSON-able form (``epsilon_lb`` flattened for the report)."""
        out = asdict(self)
        out["epsilon_lb"] = self.epsilon_lb
        return out


def inclusion_coins(m: int) -> np.ndarray:
    """``m`` fair coins from the OS entropy pool: which canaries are in."""
    bits = secrets.randbits(m) if m else 0
    return np.array([(bits >> i) & 1 for i in range(m)], dtype=bool)


class _Canaries:
    """Dirac gradients on distinct coordinates of a model's parameters."""

    def __init__(
        self, params: list[nn.Parameter], m: int, norm: float, gen: torch.Generator
    ) -> None:
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        if m > total:
            raise ValueError(
                f"{m} canaries need {m} distinct coordinates but the model has "
                f"{total} parameters; use fewer canaries or a larger model"
            )
        flat = torch.randperm(total, generator=gen)[:m]
        self.coords = flat
        offsets = np.cumsum([0, *sizes])
        self.param_of = np.searchsorted(offsets, flat.numpy(), side="right") - 1
        self.local = flat.numpy() - offsets[self.param_of]
        self.params, self.norm = params, norm

    def inject(self, sampled: np.ndarray) -> None:
        """Append the sampled canaries' gradients to every ``p.grad_sample``.

        Every parameter gets the same number of extra rows (Opacus computes a
        sample's norm across all parameters); a canary's row is zero except at
        its coordinate.
        """
        idx = np.flatnonzero(sampled)
        for j, p in enumerate(self.params):
            rows = torch.zeros((len(idx), p.numel()), dtype=p.dtype, device=p.device)
            mine = self.param_of[idx] == j
            if mine.any():
                rows[np.flatnonzero(mine), self.local[idx[mine]]] = self.norm
            extra = rows.view(len(idx), *p.shape)
            gs = p.grad_sample
            if isinstance(gs, list):  # accumulated micro-batches
                gs = torch.cat(gs, dim=0)
            if gs is None:
                gs = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            p.grad_sample = torch.cat([gs, extra], dim=0)

    def values(self) -> torch.Tensor:
        """The current values of the canary coordinates."""
        flat = torch.cat([p.detach().reshape(-1).cpu() for p in self.params])
        return flat[self.coords]


def white_box_audit(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: nn.Module,
    *,
    canaries: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float,
    delta: float,
    accountant_noise: float | None = None,
    grad_sample_mode: str = "hooks",
    confidence: float = 0.95,
) -> CanaryAuditResult:
    """Train ``model`` once with DP-SGD and white-box canaries; bound epsilon.

    Parameters
    ----------
    noise_multiplier : float
        Passed to the mechanism (``make_private``).
    accountant_noise : float, optional
        What the accountant is told; defaults to ``noise_multiplier``. Setting
        it apart from ``noise_multiplier`` simulates a broken mechanism whose
        ledger still claims the calibrated noise.

    Returns
    -------
    CanaryAuditResult
        The guesses, the bound at ``confidence`` and the accountant's epsilon
        for the steps actually run.
    """
    gen = site_generator()  # canary coordinates and sampling: OS entropy
    included = inclusion_coins(canaries)
    params = [p for p in model.parameters() if p.requires_grad]
    marks = _Canaries(params, canaries, max_grad_norm, gen)
    start = marks.values()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=learning_rate)
    net, opt, loader = make_private(
        model=model,
        optimizer=opt,
        loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=grad_sample_mode,
    )
    q = float(loader.sample_rate)

    def inject() -> None:  # each included canary, Poisson-sampled like the data
        draw = torch.rand(canaries, generator=gen).numpy() < q
        marks.inject(draw & included)

    steps = _train_with_canaries(net, opt, loader, loss_fn, params, epochs, inject)
    scores = (max_grad_norm * (start - marks.values())).numpy().astype(float)
    claimed = noise_multiplier if accountant_noise is None else accountant_noise
    eps = epsilon_for([(claimed, q, steps)], delta) if claimed > 0 else math.inf
    guess = best_guess_bound(scores, included, delta, confidence)
    log.info(
        "white-box audit: %d/%d correct guesses, eps_lb %.3f vs accountant %.3f",
        guess.correct,
        guess.k_pos + guess.k_neg,
        guess.epsilon_lb,
        eps,
    )
    return CanaryAuditResult(
        "white-box",
        canaries,
        int(included.sum()),
        steps,
        q,
        noise_multiplier,
        claimed,
        delta,
        eps,
        guess,
    )


def _train_with_canaries(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    loader: DataLoader,
    loss_fn: nn.Module,
    params: list[nn.Parameter],
    epochs: int,
    inject: Callable[[], None],
) -> int:
    """DP-SGD epochs with ``inject`` adding canary gradients before each step.

    Returns the steps run; the Opacus hooks are removed whatever happens.
    """
    steps = 0
    net.train()
    try:
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                if len(x):
                    loss_fn(net(x), y).backward()
                else:
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                inject()
                opt.step()
                steps += 1
    finally:
        net.remove_hooks()
    return steps


def linear_audit_setup(
    n_samples: int = 200, features: int = 500, classes: int = 2, seed: int = 0
) -> tuple[nn.Module, Dataset, nn.Module]:
    """A tiny linear classifier on synthetic data: enough coordinates for ~1000
    canaries, fast enough to audit in seconds on a CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (x @ w).argmax(1)
    torch.manual_seed(seed)
    model = nn.Linear(features, classes)
    return model, torch.utils.data.TensorDataset(x, y), nn.CrossEntropyLoss()


def calibrated_linear_audit(
    target_epsilon: float,
    *,
    delta: float = 1e-5,
    canaries: int = 1000,
    epochs: int = 10,
    batch_size: int = 20,
    n_samples: int = 200,
    learning_rate: float = 1.0,
    max_grad_norm: float = 1.0,
    break_noise: bool = False,
    confidence: float = 0.95,
) -> CanaryAuditResult:
    """White-box audit of a run calibrated to ``target_epsilon`` (or no DP).

    ``target_epsilon = inf`` trains without noise (the non-DP row).
    ``break_noise`` passes noise 0 to the mechanism while the accountant is
    told the calibrated noise: what a broken DP implementation looks like.
    """
    features = max(500, math.ceil(canaries / 2) + 1)
    model, data, loss_fn = linear_audit_setup(n_samples, features)
    steps_per_epoch = math.ceil(n_samples / batch_size)
    q = 1.0 / steps_per_epoch
    if math.isinf(target_epsilon):
        sigma = 0.0
    else:
        sigma = calibrate_noise(target_epsilon, delta, q, steps_per_epoch * epochs)
    return white_box_audit(
        model,
        data,
        loss_fn,
        canaries=canaries,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        noise_multiplier=0.0 if break_noise else sigma,
        accountant_noise=sigma,
        delta=delta,
        confidence=confidence,
    )
