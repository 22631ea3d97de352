"""What the privacy ledger holds, as values that check themselves.

A DP-SGD round (:class:`LedgerEntry`) can only be built from values a real
round has (:func:`check_entry_values`): the ledger only grows, and no entry can
cancel another. A run's schedule (:class:`RunSchedule`), the site's own limits
(:class:`SiteLimits`) and a run's calibration (:class:`Calibration`) are what
:meth:`client.privacy.ledger.PrivacyLedger.spend_round` checks a round
against. Plain data, no file access.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


class InvalidEntry(ValueError):
    """An entry the ledger never takes: it could lower or misstate what was spent.

    Steps below 1 would cancel earlier steps of the same (noise, rate) when the
    accountant adds them up; a noise multiplier of 0 or a sample rate outside
    (0, 1] is not a DP-SGD step the accountant can bound.
    """


def check_entry_values(noise: object, sample_rate: object, steps: object) -> None:
    """Refuse (noise, rate, steps) that no real DP-SGD round has.

    Raises
    ------
    InvalidEntry
        Steps not an integer of at least 1, noise not a finite number above 0,
        or a sample rate not a finite number in (0, 1].
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidEntry(f"steps must be an integer of at least 1, not {steps!r}")
    for name, v in (("noise multiplier", noise), ("sample rate", sample_rate)):
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if not number or not math.isfinite(v):  # type: ignore[arg-type]
            raise InvalidEntry(f"{name} must be a finite number, not {v!r}")
    if not noise > 0:  # type: ignore[operator]
        raise InvalidEntry(f"noise multiplier must be above 0, not {noise!r}")
    if not 0 < sample_rate <= 1:  # type: ignore[operator]
        raise InvalidEntry(f"sample rate must be in (0, 1], not {sample_rate!r}")


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD as the accountant needs it, plus provenance.

    Built only with values :func:`check_entry_values` accepts: the ledger
    only grows.
    """

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    dataset: str
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        check_entry_values(self.noise_multiplier, self.sample_rate, self.steps)
        if not isinstance(self.run_id, str) or not self.run_id:
            raise InvalidEntry(f"run id must be a non-empty string: {self.run_id!r}")


@dataclass(frozen=True)
class RunSchedule:
    """What a run's noise is calibrated for, as the site accepted it.

    A calibration is bound to its run id and this schedule: the same run id
    with another target, delta, batch size, round count, epochs or fine-tune
    steps is refused, so a coordinator cannot calibrate a run's noise for one
    schedule and then run another under it.
    """

    target_epsilon: float
    delta: float
    batch_size: int
    total_rounds: int
    local_epochs: int
    fine_tune_steps: int


@dataclass(frozen=True)
class SiteLimits:
    """The site's own bounds on a run (site YAML ``privacy``)."""

    max_epsilon: float  # the lifetime ceiling
    run_epsilon: float  # the most one run may spend
    min_noise: float  # the least noise multiplier any step runs with


@dataclass(frozen=True)
class Calibration:
    """The noise a run uses, fixed at its first round for all its rounds."""

    run_id: str
    target_epsilon: float
    delta: float
    sample_rate: float
    planned_steps: int
    noise_multiplier: float
    # what the run was calibrated for (RunSchedule); None in ledgers written
    # before issue 27, whose calibrations are bound to target and delta only
    schedule: dict | None = None
