"""How far one site may move the global model: its share, and its update's size.

Two bounds, applied by ``server/strategy/capped_mean.py`` (the cap) and
``server/strategy/guard.py`` (the norm rule):

- **the weight cap** (:func:`capped_shares`, in ``common/shares.py`` because
  the evaluation means and the preprocessing plan use it too): the
  case-weighted shares of the round's updates (``num-examples`` / total) are
  capped at ``max-site-weight``, and what a capped site loses goes to the
  others in proportion to their cases (water-filling, repeated until no share
  is over the cap). With K updates and ``max-site-weight <= 1/K`` every share
  is 1/K. ``num-examples`` is a site's claim, bounded by ``max-site-examples``
  before it gets here; the cap bounds what a false one can buy.
- **the norm rule** (:func:`norm_outliers`): an update is rejected when its
  distance from the global model is more than ``guard-norm-factor`` times the
  median distance of the round's other updates. Under DP-SGD a site's update is
  mostly noise whose size the plan and the site's reply predict
  (:meth:`LocalTraining.noise_scale`); a site expected to carry more noise than
  the others gets a proportionally larger allowance, at most
  :data:`MAX_NOISE_ALLOWANCE` times, however much noise it claims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common import wire
from common.config import SGD_MOMENTUM, Plan
from common.shares import capped_shares

__all__ = [
    "MAX_NOISE_ALLOWANCE",
    "LocalTraining",
    "capped_shares",
    "norm_outliers",
]

# The most the norm rule's allowance grows for a site's expected DP noise: the
# noise a site reports is its own claim, so a claim buys at most this much.
MAX_NOISE_ALLOWANCE = 10.0


@dataclass(frozen=True)
class LocalTraining:
    """The plan's local training, as far as it sets the size of DP noise."""

    batch_size: int
    local_epochs: int
    learning_rate: float
    optimizer: str
    max_grad_norm: float

    @classmethod
    def from_plan(cls, plan: Plan) -> LocalTraining:
        """The values of ``plan`` that the noise in an update depends on."""
        return cls(
            batch_size=plan.batch_size,
            local_epochs=plan.local_epochs,
            learning_rate=plan.learning_rate,
            optimizer=plan.optimizer,
            max_grad_norm=plan.dp_max_grad_norm,
        )

    def noise_scale(self, metrics: Mapping[str, float]) -> float:
        """Expected standard deviation, per parameter, of the DP noise in a
        site's update after one round; 0 for a site without DP.

        With ``n`` training cases the site runs ``T = local-epochs x
        ceil(n / batch-size)`` Poisson steps of expected batch
        ``B = n / ceil(n / batch-size)``
        (``client.privacy.accounting.poisson_schedule``); each step's averaged
        gradient carries Gaussian noise of std ``noise-multiplier x
        dp-max-grad-norm / B`` per parameter.

        - ``sgd`` (momentum ``mu``): the update is ``-lr`` times the sum of the
          momentum buffers, so the noise has std
          ``lr x sigma x C / B x sqrt(sum_k ((1 - mu^k) / (1 - mu))^2)``,
          ``k = 1..T``;
        - ``adam``: under DP each parameter's gradient is dominated by noise, and
          Adam divides it by its own running RMS, so every step moves a
          parameter by about ``lr`` in a random direction: std about
          ``lr x sqrt(T)``, whatever the noise multiplier (exact at ``T = 1``).

        Parameters
        ----------
        metrics : mapping
            The site's train reply metrics (``dp-enabled``, ``noise-multiplier``,
            ``num-examples``): claims, bounded by the caller.
        """
        sigma = float(metrics.get(wire.NOISE_MULTIPLIER, 0.0))
        n = float(metrics.get(wire.NUM_EXAMPLES, 0.0))
        if not metrics.get(wire.DP_ENABLED) or not sigma > 0 or not n >= 1:
            return 0.0
        if math.isinf(sigma) or math.isinf(n):
            return math.inf
        steps_per_epoch = max(1, math.ceil(n / self.batch_size))
        steps = self.local_epochs * steps_per_epoch
        if self.optimizer == "adam":
            return self.learning_rate * math.sqrt(steps)
        per_step = sigma * self.max_grad_norm * steps_per_epoch / n
        return self.learning_rate * per_step * math.sqrt(_momentum_sum(steps))


def _momentum_sum(steps: int, mu: float = SGD_MOMENTUM) -> float:
    """``sum_{k=1..T} ((1 - mu^k) / (1 - mu))^2``: how heavy-ball momentum
    amplifies the variance of independent per-step noise over ``T`` steps."""
    geo = mu * (1 - mu**steps) / (1 - mu)
    geo2 = mu**2 * (1 - mu ** (2 * steps)) / (1 - mu**2)
    return (steps - 2 * geo + geo2) / (1 - mu) ** 2


def noise_allowance(scale: float, others: Sequence[float]) -> float:
    """How many times the usual norm bound a site's expected noise earns:
    ``max(1, scale / median(others))``, at most :data:`MAX_NOISE_ALLOWANCE`.

    A site without DP noise (scale 0) gets 1. A DP site whose others mostly
    carry none (median 0) gets the maximum.
    """
    if not scale > 0 or not others:
        return 1.0
    ref = float(np.median(others))
    if ref <= 0:
        return MAX_NOISE_ALLOWANCE
    return min(MAX_NOISE_ALLOWANCE, max(1.0, scale / ref))


def norm_outliers(
    norms: Mapping[str, float],
    factor: float,
    scales: Mapping[str, float] | None = None,
) -> dict[str, str]:
    """Sites whose update norm is more than its allowance:
    ``factor x median(others' norms) x noise_allowance(...)``.

    Each update is compared with the median of the *other* updates, so one
    scaled update among two is caught too. No rule without others, with
    ``factor <= 0``, or when the others did not move (median 0).

    Parameters
    ----------
    norms : mapping
        L2 norm of ``update - global`` by site.
    factor : float
        ``guard-norm-factor``.
    scales : mapping, optional
        Expected DP noise per site (:meth:`LocalTraining.noise_scale`); a site
        missing from it counts as without DP.
    """
    out: dict[str, str] = {}
    if factor <= 0 or len(norms) < 2:
        return out
    scales = scales or {}
    for site, norm in norms.items():
        others = [s for s in norms if s != site]
        med = float(np.median([norms[s] for s in others]))
        allow = noise_allowance(
            scales.get(site, 0.0), [scales.get(s, 0.0) for s in others]
        )
        if med > 0 and norm > factor * med * allow:
            extra = (
                f", allowing {allow:.3g}x for its expected DP noise"
                if allow > 1
                else ""
            )
            out[site] = (
                f"update norm {norm:.4g} is more than {factor:g} x the median "
                f"{med:.4g} of the round's other updates{extra} (guard-norm-factor)"
            )
    return out
