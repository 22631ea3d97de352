"""The update guard: what a site's update must be to enter the aggregate.

An update whose arrays have missing or extra keys, other shapes or dtypes, or
NaN/Inf is rejected (``server/strategy/updates.py`` reads each update once), and so is
one whose distance from the global model (L2 norm of update - global) is more
than ``norm_factor`` times the median of the round's other updates, more for a
site whose DP noise predicts a larger update (``server/strategy/influence.py``). The
round goes on with the rest.

For FedAvg and FedProx the same pass also computes the case-weighted mean
(``server/strategy/capped_mean.py`` gives the weights), so the replies are decoded once.

The aggregate itself is held to the same rules before it is kept
(:func:`aggregate_problem`): the global model's keys, shapes and dtypes, finite
values, and, for strategies that only average or select the accepted updates,
no further from the global model than those updates allow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, Message

from common import wire
from common.contract import safe_text
from server.reporting.round_record import RoundRecord
from server.strategy.influence import LocalTraining, norm_outliers
from server.strategy.replies import part
from server.strategy.reply_filter import MAX_REASON, Candidate
from server.strategy.updates import (
    check_update,
    model_scale,
    scan_updates,
    update_norm,
)

log = logging.getLogger("kidneyfl.server")

# (site, reply): an update that passed the guard.
Accepted = tuple[str, Message]
# The mean's weights for these replies, or None where Flower aggregates itself.
MeanFactors = Callable[[list[Message]], list[float] | None]


@dataclass
class UpdateGuard:
    """The guard's rules for one run.

    Parameters
    ----------
    min_sites : int
        Fewest accepted updates for a round to aggregate; with fewer
        candidates no mean is computed in the guard's pass.
    norm_factor : float
        Reject an update whose norm (update - global) is more than this many
        times the median of the round's other updates; 0 turns the rule off.
    training : LocalTraining, optional
        The plan's local training, to widen the norm rule for a site's expected
        DP noise; without it every site gets the same bound.
    """

    min_sites: int
    norm_factor: float = 0.0
    training: LocalTraining | None = None

    def screen(
        self,
        rec: RoundRecord,
        sent: ArrayRecord | None,
        candidates: list[Candidate],
        mean_factors: MeanFactors,
    ) -> tuple[list[Accepted], dict[str, Array] | None]:
        """The accepted updates (with their sites) and, when ``mean_factors``
        gives weights and none was rejected, their weighted mean.

        Accepted sites' metrics go to ``rec.train``; rejected ones to
        ``rec.rejected`` with the reason; norms to ``rec.update_norms``.
        """
        if sent is None:  # nothing to compare with
            rec.train.update({site: metrics for site, _, metrics in candidates})
            return [(site, msg) for site, msg, _ in candidates], None
        msgs = [msg for _, msg, _ in candidates]
        factors = mean_factors(msgs) if len(msgs) >= self.min_sites else None
        scans, mean = scan_updates(
            sent, [part(m, wire.ARRAYS, ArrayRecord) for m in msgs], factors
        )
        passed: list[Accepted] = []
        norms: dict[str, float] = {}
        scales: dict[str, float] = {}
        for (site, msg, metrics), scan in zip(candidates, scans, strict=True):
            if scan.problem:
                self._reject(rec, site, scan.problem)
                continue
            rec.train[site] = metrics
            passed.append((site, msg))
            norms[site] = scan.norm
            if self.training is not None:
                scales[site] = self.training.noise_scale(metrics)
        rec.update_norms.update(norms)
        outliers = norm_outliers(norms, self.norm_factor, scales)
        for site, why in outliers.items():
            self._reject(rec, site, why)
            rec.train.pop(site, None)
        accepted = [(site, msg) for site, msg in passed if site not in outliers]
        return accepted, mean if len(accepted) == len(msgs) else None

    @staticmethod
    def _reject(rec: RoundRecord, site: str, why: str) -> None:
        # array names in a reason are the site's own text: escaped and bounded
        why = safe_text(why, MAX_REASON)
        rec.rejected[site] = why
        log.warning("update from %s rejected in round %d: %s", site, rec.round, why)


def aggregate_problem(
    sent: ArrayRecord | None,
    aggregate: ArrayRecord,
    norms: Sequence[float] | None,
) -> str | None:
    """Why a round's aggregate may not become the global model (None: it may).

    Parameters
    ----------
    sent : ArrayRecord or None
        The global model the round's updates were made from.
    aggregate : ArrayRecord
        The strategy's result, in the global model's dtypes.
    norms : sequence of float, optional
        Distances from ``sent`` of the accepted updates, when the strategy
        only averages or selects them coordinate by coordinate (FedAvg,
        FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan): each
        coordinate of the aggregate then lies between the updates' own, so
        ``||aggregate - sent||^2 <= sum_k ||update_k - sent||^2``, to rounding.
        None for server optimisers and central DP, whose steps are their own.
    """
    problem = check_update(sent if sent is not None else aggregate, aggregate)
    if problem is not None:
        return f"the aggregate is not a model like the global one: {problem}"
    if sent is None or not norms:
        return None
    bound = math.sqrt(math.fsum(n * n for n in norms))
    moved = update_norm(sent, aggregate)
    # rounding: a few ulps per site and coordinate, of the values' own size
    size, eps = model_scale(sent)
    scale = size + bound
    slack = 4 * (len(norms) + 1) * eps * scale + 1e-12
    if not moved <= bound + slack:
        return (
            f"the aggregate moved the model by {moved:.4g}, more than the "
            f"accepted updates allow ({bound:.4g})"
        )
    return None
