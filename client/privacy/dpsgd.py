"""DP-SGD at the site: the round's settings, Opacus wrapping, the site's entropy.

The noise and the Poisson sampling come from generators seeded from the
operating system's entropy at the site, fresh for every training call
(:func:`site_generator`); nothing the coordinator sends or knows seeds them.
What a round may spend is decided before it runs, by the ledger
(:mod:`client.privacy.ledger`).
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass

import torch

from client.privacy.accounting import ACCOUNTANT


@dataclass(frozen=True)
class DPSpec:
    """DP-SGD settings for one round."""

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str


def site_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the operating system's entropy, for one use.

    DP noise and Poisson sampling draw from generators made here, a fresh one for
    every training call: nothing the coordinator sends or can guess (plan seed,
    round, site name) enters the seed. 64 bits of OS entropy seed PyTorch's
    generator; see docs/privacy.md for what this does and does not protect.
    """
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(secrets.randbits(64))
    return gen


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
) -> tuple:
    """Wrap model, optimiser and loader for DP-SGD with Poisson sampling.

    Returns ``(model, optimizer, loader)``. The Poisson sampler and the noise
    each draw from their own :func:`site_generator`, never from ``loader``'s
    generator or torch's global one, and the noise is sampled the way Opacus'
    ``secure_mode`` samples it (resistant to floating-point attacks on the
    Gaussian sampler). The engine's own accountant is not used for claims: the
    ledger composes the whole history instead.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with warnings.catch_warnings():
        # secure_mode=False only because Opacus would import torchcsprng for its
        # own generator; ours comes from the OS and secure sampling is set below
        warnings.filterwarnings("ignore", "Secure RNG turned off", UserWarning)
        engine = PrivacyEngine(accountant=ACCOUNTANT)
    private_loader = DPDataLoader.from_data_loader(loader, generator=site_generator())
    net, opt, _ = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=private_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
        noise_generator=site_generator(device),
    )
    opt.secure_mode = True
    return net, opt, private_loader
