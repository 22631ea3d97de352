"""Patient-level differential privacy at the site: DP-SGD and the privacy ledger.

The site, not the coordinator, owns the budget. Every round's (noise multiplier,
sample rate, steps) is appended to a ledger in the site's state directory, written
atomically with a checksum under an exclusive file lock, and epsilon is always
computed by one tight accountant (Opacus' PRV accountant, an upper bound within
``EPS_ERROR`` of the exact value) over the *whole* history: across rounds,
restarts and runs on the same site. The budget check and the spend are one
locked step (:meth:`PrivacyLedger.spend`), taken before training starts, so two
trainings at one site can never both pass the ceiling.

The noise and the Poisson sampling come from generators seeded from the
operating system's entropy at the site, fresh for every training call
(:func:`site_generator`); nothing the coordinator sends or knows seeds them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import secrets
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

log = logging.getLogger(__name__)

LEDGER_FORMAT = "kidneyfl-privacy-ledger/2"
LEDGER_FORMATS_READ = ("kidneyfl-privacy-ledger/1", LEDGER_FORMAT)
LEDGER_NAME = "privacy-ledger.json"
LOCK_NAME = "privacy-ledger.lock"
# The accountant new ledgers use. Ledgers written before it (format 1) keep the
# RDP accountant they were checked with: a site's record never changes method
# behind its back.
ACCOUNTANT = "prv"
ACCOUNTANTS = ("prv", "rdp")
# PRV's error bound on epsilon: get_epsilon returns the *upper* end, so the
# reported value is never below the exact one.
EPS_ERROR = 1e-3


class LedgerError(RuntimeError):
    """The ledger is unreadable or fails its checksum; the site must not train."""


class BudgetExceeded(RuntimeError):
    """The next round would take the site past its own epsilon ceiling."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD as the accountant needs it, plus provenance."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    dataset: str
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Calibration:
    """The noise a run uses, fixed at its first round for all its rounds."""

    run_id: str
    target_epsilon: float
    delta: float
    sample_rate: float
    planned_steps: int
    noise_multiplier: float


def merged(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """``history`` with the steps of equal (noise, sample rate) pairs added up.

    Composition does not depend on order, so this is the same mechanism; the PRV
    accountant's cost grows with the number of entries, not with the steps.
    """
    steps: dict[tuple[float, float], int] = {}
    for noise, q, n in history:
        steps[(float(noise), float(q))] = steps.get((float(noise), float(q)), 0) + n
    return [(noise, q, n) for (noise, q), n in sorted(steps.items()) if n > 0]


def epsilon_for(
    history: list[tuple[float, float, int]],
    delta: float,
    accountant: str = ACCOUNTANT,
    eps_error: float = EPS_ERROR,
) -> float:
    """Epsilon of a DP-SGD history ``[(noise, sample_rate, steps), ...]``.

    ``accountant`` is ``prv`` (tight; the upper end of its error bound) or
    ``rdp``. Where PRV cannot evaluate a history (extreme parameters), the RDP
    value is returned: RDP is never below the exact epsilon either.
    """
    hist = merged(history)
    if not hist:
        return 0.0
    if accountant == "prv":
        try:
            prv = PRVAccountant()
            prv.history = hist
            with np.errstate(divide="ignore"):  # log(1 - q) at q = 1: handled
                eps = float(prv.get_epsilon(delta=delta, eps_error=eps_error))
            if math.isfinite(eps):
                return eps
        except (ValueError, RuntimeError, OverflowError, ZeroDivisionError) as exc:
            log.warning("PRV accountant failed (%s); using RDP (larger)", exc)
    rdp = RDPAccountant()
    rdp.history = hist
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Optimal order", UserWarning)
        return float(rdp.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = ACCOUNTANT,
) -> float:
    """Noise multiplier so that ``steps`` steps at ``sample_rate`` reach the target.

    Calibrated for the steps actually run over the whole plan (rounds x local
    epochs x steps per epoch), not per round, with the accountant the ledger
    reports with: a bisection to 0.5 % of the noise, then the result is checked
    with :func:`epsilon_for` and raised until it meets the target, so
    calibration never promises less than it spends. Cached per process: every
    site with the same schedule gets the same answer.
    """
    if accountant == "rdp":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Optimal order", UserWarning)
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                    epsilon_tolerance=0.005,
                )
            )

    def eps(noise: float, error: float = 0.01) -> float:
        # the search uses PRV's coarser bound (an upper bound as well); the
        # final check below uses the ledger's
        return epsilon_for([(noise, sample_rate, steps)], delta, accountant, error)

    hi = 1.0
    while eps(hi) > target_epsilon:  # bracket: hi meets the target, lo does not
        hi *= 2.0
    lo = hi / 2.0
    while eps(lo) <= target_epsilon and lo > 1e-3:
        hi, lo = lo, lo / 2.0
    while hi - lo > 0.005 * hi:
        mid = (hi + lo) / 2
        hi, lo = (mid, lo) if eps(mid) <= target_epsilon else (hi, mid)
    while eps(hi, EPS_ERROR) > target_epsilon:
        hi *= 1.002
    return hi


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


def poisson_schedule(n_cases: int, batch_size: int) -> tuple[float, int]:
    """Sample rate and steps per epoch, exactly as Opacus' DPDataLoader runs them."""
    steps = max(1, math.ceil(n_cases / batch_size))
    return 1.0 / steps, steps


class PrivacyLedger:
    """Durable record of everything this site has spent.

    Parameters
    ----------
    state_dir : Path
        The site's state directory (from the site YAML).
    site : str
        Site name, stored in the file to catch a ledger copied between sites.

    Every change reloads the file under an exclusive lock (``privacy-ledger.lock``
    beside it), so processes that share a state directory see each other's
    spends: one ledger, one writer at a time.
    """

    def __init__(self, state_dir: Path, site: str) -> None:
        self.path = Path(state_dir) / LEDGER_NAME
        self.lock_path = Path(state_dir) / LOCK_NAME
        self.site = site
        self.accountant = ACCOUNTANT
        self.entries: list[LedgerEntry] = []
        self.calibrations: dict[str, Calibration] = {}
        self._load()

    # -- persistence ---------------------------------------------------------
    def _payload(self) -> dict:
        return {
            "format": LEDGER_FORMAT,
            "site": self.site,
            "accountant": self.accountant,
            "calibrations": {
                k: asdict(v) for k, v in sorted(self.calibrations.items())
            },
            "entries": [asdict(e) for e in self.entries],
        }

    @staticmethod
    def _digest(payload: dict) -> str:
        canon = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def _load(self) -> None:
        self.accountant, self.entries, self.calibrations = ACCOUNTANT, [], {}
        if not self.path.exists():
            return
        fix = (
            f"restore {self.path} from the site's backup; never delete it, or the "
            "site would lose the record of privacy already spent"
        )
        try:
            doc = json.loads(self.path.read_text())
            digest = doc.pop("sha256")
            if doc.get("format") not in LEDGER_FORMATS_READ:
                raise LedgerError(f"{self.path}: unknown ledger format; {fix}")
            if self._digest(doc) != digest:
                raise LedgerError(
                    f"{self.path}: checksum mismatch, the ledger was altered or "
                    f"damaged; {fix}"
                )
            if doc["site"] != self.site:
                raise LedgerError(
                    f"{self.path}: ledger belongs to site {doc['site']!r}, not "
                    f"{self.site!r}; point state_dir at this site's own directory"
                )
            accountant = doc.get("accountant", "rdp")  # format 1 was checked by RDP
            if accountant not in ACCOUNTANTS:
                raise LedgerError(f"{self.path}: unknown accountant; {fix}")
            self.accountant = accountant
            self.entries = [LedgerEntry(**e) for e in doc["entries"]]
            self.calibrations = {
                k: Calibration(**v) for k, v in doc["calibrations"].items()
            }
        except LedgerError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"{self.path}: unreadable or truncated ({type(exc).__name__}); {fix}"
            ) from None

    def _save(self) -> None:
        payload = self._payload()
        payload["sha256"] = self._digest(payload)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Hold the ledger's exclusive lock, with the file freshly reloaded.

        Changes made inside are saved before the lock is released.
        """
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                self._load()
                yield self
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # -- accounting ----------------------------------------------------------
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's history over every run and round recorded."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon spent by this site, at ``delta``."""
        return epsilon_for(self.history(), delta, self.accountant)

    def epsilon_after(
        self, delta: float, noise: float, sample_rate: float, steps: int
    ) -> float:
        """Cumulative epsilon if one more round of ``steps`` steps were run."""
        return epsilon_for(
            self.history() + [(noise, sample_rate, steps)], delta, self.accountant
        )

    def calibrate(
        self,
        run_id: str,
        target_epsilon: float,
        delta: float,
        n_cases: int,
        batch_size: int,
        total_epochs: int,
        extra_steps: int = 0,
    ) -> Calibration:
        """The run's noise: reused if this run was calibrated before, else new.

        ``extra_steps`` are steps the run takes beyond its epochs (per-site
        fine-tuning of the final model), so they fit in the same target.
        """
        with self.locked():
            if run_id in self.calibrations:
                return self.calibrations[run_id]
            q, steps_per_epoch = poisson_schedule(n_cases, batch_size)
            planned = steps_per_epoch * total_epochs + extra_steps
            noise = calibrate_noise(target_epsilon, delta, q, planned, self.accountant)
            cal = Calibration(run_id, target_epsilon, delta, q, planned, noise)
            self.calibrations[run_id] = cal
            self._save()
        log.info(
            "calibrated noise %.4f for target epsilon %.3g at delta %.3g over %d "
            "steps (%s accountant)",
            noise,
            target_epsilon,
            delta,
            planned,
            self.accountant,
        )
        return cal

    def record(self, entry: LedgerEntry) -> None:
        """Append one round and persist atomically, under the lock."""
        with self.locked():
            self.entries.append(entry)
            self._save()

    def spend(
        self,
        entry: LedgerEntry,
        max_epsilon: float,
        delta: float,
        target_epsilon: float,
    ) -> float:
        """Check the budget and record ``entry`` as one locked step.

        Called *before* training: the spend is on record whatever happens next,
        and a second training started at the same time sees it. Returns the
        cumulative epsilon after the entry.

        Raises
        ------
        BudgetExceeded
            If the plan's target or the entry would pass ``max_epsilon``.
        """
        with self.locked():
            after = check_budget(
                self,
                self.site,
                max_epsilon,
                delta,
                target_epsilon,
                entry.noise_multiplier,
                entry.sample_rate,
                entry.steps,
            )
            self.entries.append(entry)
            self._save()
        return after

    def runs_summary(self, delta: float) -> list[dict]:
        """Per run: rounds, steps and the epsilon that run alone would have spent."""
        out: dict[str, dict] = {}
        for e in self.entries:
            r = out.setdefault(
                e.run_id, {"run_id": e.run_id, "rounds": 0, "steps": 0, "hist": []}
            )
            r["rounds"] += 1
            r["steps"] += e.steps
            r["hist"].append((e.noise_multiplier, e.sample_rate, e.steps))
            r["noise_multiplier"] = e.noise_multiplier
            r["last_time"] = e.time
        for r in out.values():
            r["epsilon_alone"] = epsilon_for(r.pop("hist"), delta, self.accountant)
        return list(out.values())


def check_budget(
    ledger: PrivacyLedger,
    site: str,
    max_epsilon: float,
    delta: float,
    target_epsilon: float,
    noise_multiplier: float,
    sample_rate: float,
    round_steps: int,
) -> float:
    """Refuse a round that would pass the site's ceiling; return epsilon after it.

    Raises
    ------
    BudgetExceeded
        With both numbers in the message.
    """
    if target_epsilon > max_epsilon:
        raise BudgetExceeded(
            f"site {site}: the plan asks for epsilon {target_epsilon:g} but this site "
            f"allows at most {max_epsilon:g} (privacy.max_epsilon); lower the plan's "
            "dp-target-epsilon"
        )
    after = ledger.epsilon_after(delta, noise_multiplier, sample_rate, round_steps)
    if after > max_epsilon:
        spent = ledger.epsilon(delta)
        raise BudgetExceeded(
            f"site {site}: this round would bring epsilon from {spent:.3f} to "
            f"{after:.3f}, past the site's ceiling {max_epsilon:g} at delta {delta:g}"
        )
    return after


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
