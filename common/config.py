"""Configuration schemas: the federation plan (here) and a site's YAML
(``common/site_config.py``, re-exported here).

Validated once, at the boundary. Errors name the file, the key and the fix;
unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.config_base import ConfigError, _explain, _numbers, _triple
from common.plan_tasks import MAX_SURVIVAL_HORIZONS, MAX_SURVIVAL_INTERVALS, TaskOptions

# Flower's own strategies a plan may name (server/strategy/aggregators.py builds them).
StrategyName = Literal[
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
]


# The momentum of the plan's ``optimizer = "sgd"`` at every site; the
# coordinator's update guard predicts DP noise with it (server/strategy/influence.py).
SGD_MOMENTUM = 0.9

# A run's name is a folder under out-dir: one path segment of plain characters,
# never "." or ".." (the first character is a letter or digit), never a path.
RUN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
_RUN_NAME_FIX = (
    "use 1 to 100 letters, digits, '_', '.' or '-', starting with a letter or "
    "digit, e.g. kidney-2026-05; it names a folder under out-dir"
)
_OUT_DIR_MAX = 1024


def check_run_name(name: str) -> str:
    """``name`` if it is a safe run name (:data:`RUN_NAME_PATTERN`).

    Raises
    ------
    ValueError
        Saying what is wrong and the fix (the caller names the key).
    """
    if not isinstance(name, str) or not re.fullmatch(RUN_NAME_PATTERN, name):
        shown = repr(name[:40] + ("..." if len(name) > 40 else ""))
        raise ValueError(f"{shown} is not a run name: {_RUN_NAME_FIX}")
    return name


def check_out_dir(path: str) -> str:
    """``path`` if it can be the output folder: not empty, at most 1024
    characters, no control characters (NUL included) and no ``..`` part, so
    the folder is the one the plan names and not one it climbs to.

    Raises
    ------
    ValueError
        Saying what is wrong and the fix (the caller names the key).
    """
    fix = "give a folder such as runs or /srv/kidneyfl/runs"
    if not path.strip():
        raise ValueError(f"the output folder is empty; {fix}")
    if len(path) > _OUT_DIR_MAX:
        raise ValueError(f"longer than {_OUT_DIR_MAX} characters; {fix}")
    if not path.isprintable():
        raise ValueError(f"holds a control character (NUL, newline...); {fix}")
    if ".." in re.split(r"[/\\]", path):
        raise ValueError(f"{path!r} climbs out with '..'; {fix}")
    return path


def run_folder(
    out_dir: str | Path,
    run_name: str,
    source: str = "plan",
    keys: tuple[str, str] = ("out-dir", "run-name"),
) -> Path:
    """The run's folder, ``<out-dir>/<run-name>``, resolved and checked.

    Both names are checked (:func:`check_out_dir`, :func:`check_run_name`),
    then the resolved folder must lie directly inside the resolved output
    folder: a link under out-dir that points elsewhere is refused too.
    Nothing is created or written. ``keys`` are what the error calls the two
    (the plan's keys, or a command's flags).

    Raises
    ------
    ConfigError
        Naming ``source``, the key and the fix.
    """
    where = f"{source}: " if source else ""
    for key, check, value in zip(
        keys, (check_out_dir, check_run_name), (str(out_dir), run_name), strict=True
    ):
        try:
            check(value)
        except ValueError as exc:
            raise ConfigError(f"{where}{key}: {exc}") from None
    out = Path(out_dir).expanduser().resolve()
    run = (out / run_name).resolve()
    if run.parent != out:
        raise ConfigError(
            f"{where}{keys[1]}: {out / run_name} leads to {run}, outside "
            f"{keys[0]} {out}; remove that link or choose another {keys[1]}"
        )
    return out / run_name  # the name as given: it is the run's identity


class Plan(TaskOptions):
    """The federation plan, shared by the coordinator and every site.

    Built from Flower's run config (``[tool.flwr.app.config]``), whose keys are
    kebab-case; field aliases keep those names. The keys only classification
    and prognosis read, with their checks, are :class:`TaskOptions`'s
    (``common/plan_tasks.py``).
    """

    # NaN and infinity are refused for every number: a site calibrates, spends
    # and trains on these values (issue 27), and inf > 0 would pass a bound.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False
    )

    # Every default equals [tool.flwr.app.config], the demo's plan, so a plan
    # built in code and one from ``flwr run .`` agree (tests/common/test_config.py
    # checks each key).
    task: Literal["segmentation", "classification", "prognosis"] = "segmentation"
    model: str = "unet-tiny"
    strategy: StrategyName = "fedavg"
    num_server_rounds: int = Field(5, alias="num-server-rounds", ge=1, le=10_000)
    local_epochs: int = Field(2, alias="local-epochs", ge=1, le=1000)
    batch_size: int = Field(48, alias="batch-size", ge=1, le=512)
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(0.01, alias="learning-rate", gt=0, le=10)
    spacing_mm: tuple[float, float, float] = Field((4.0, 4.0, 5.0), alias="spacing-mm")
    patch_size: tuple[int, int, int] = Field((32, 32, 32), alias="patch-size")
    hu_window: tuple[float, float] = Field((-150.0, 350.0), alias="hu-window")
    min_sites: int = Field(2, alias="min-sites", ge=1)
    fraction_evaluate: float = Field(1.0, alias="fraction-evaluate", ge=0, le=1)
    round_timeout: float = Field(900.0, alias="round-timeout", gt=0)
    seed: int = 0
    dp_target_epsilon: float = Field(8.0, alias="dp-target-epsilon", gt=0)
    dp_max_grad_norm: float = Field(1.0, alias="dp-max-grad-norm", gt=0)
    # Patches per drawn patient and step, gradients averaged before clipping
    # (De et al. 2022); the patient stays the unit of privacy.
    augmentation_multiplicity: int = Field(
        1, alias="augmentation-multiplicity", ge=1, le=64
    )
    # Training patches: "foreground" (2 of 3 centred on any foreground voxel) or
    # "label-classes" (centred on background, kidney, tumour, cyst by
    # patch-class-ratios); augmentation: random flips on every axis and
    # intensity scale and shift.
    patch_sampling: Literal["foreground", "label-classes"] = Field(
        "foreground", alias="patch-sampling"
    )
    patch_class_ratios: tuple[float, float, float, float] = Field(
        (1.0, 1.0, 2.0, 1.0), alias="patch-class-ratios"
    )
    augmentation: bool = False
    # Recipe across rounds (issue 19), off by default: the coordinator's
    # exponential moving average of the global model (ema-decay d in [0, 1);
    # 0 is off), which evaluation measures and the run delivers; and the
    # learning rate of each global round (constant, or cosine from
    # learning-rate down to learning-rate x lr-min-factor).
    ema_decay: float = Field(0.0, alias="ema-decay")
    # Which parameters a site trains (the rest stay as the global model has
    # them): "all", "biases" (every bias; DP-BiTFiT, Bu et al. 2022) or
    # "norms-biases" (also the norm layers' scales). DP noise grows with the
    # number of trained parameters; for fine-tuning a pretrained model.
    trainable_parameters: Literal["all", "biases", "norms-biases"] = Field(
        "all", alias="trainable-parameters"
    )
    lr_schedule: Literal["constant", "cosine"] = Field("constant", alias="lr-schedule")
    lr_min_factor: float = Field(0.1, alias="lr-min-factor")
    # The scans' modality (issue 29, docs/mr.md): each site's data.modality
    # must equal it, or it is "mixed" (each site preprocesses by its own).
    modality: Literal["CT", "MR", "mixed"] = "CT"
    # Set by the federated preprocessing plan (not run config): z-score
    # normalisation after clipping to the HU window, as nnU-Net does for CT.
    intensity_mean: float | None = Field(None, alias="intensity-mean")
    intensity_std: float | None = Field(None, alias="intensity-std", gt=0)
    fingerprint_round: bool = Field(False, alias="fingerprint-round")
    fingerprint_min_cases: int = Field(5, alias="fingerprint-min-cases", ge=1)
    central_dp: Literal["off", "server-fixed"] = Field("off", alias="central-dp")
    central_dp_noise: float = Field(0.1, alias="central-dp-noise", ge=0)
    central_dp_clip: float = Field(10.0, alias="central-dp-clip", gt=0)
    # Aggregation strategies, update guard, personalisation (issue 7); see
    # docs/strategies.md. 0 for server-learning-rate: the strategy's own default.
    proximal_mu: float = Field(0.0, alias="proximal-mu", ge=0)
    server_learning_rate: float = Field(0.0, alias="server-learning-rate", ge=0)
    server_momentum: float = Field(0.0, alias="server-momentum", ge=0, lt=1)
    server_beta_1: float = Field(0.9, alias="server-beta-1", ge=0, lt=1)
    server_beta_2: float = Field(0.99, alias="server-beta-2", ge=0, lt=1)
    server_tau: float = Field(1e-3, alias="server-tau", gt=0)
    trimmed_beta: float = Field(0.2, alias="trimmed-beta", ge=0, lt=0.5)
    num_malicious_sites: int = Field(0, alias="num-malicious-sites", ge=0)
    krum_select: int = Field(1, alias="krum-select", ge=1)
    guard_norm_factor: float = Field(10.0, alias="guard-norm-factor", ge=0)
    # Privacy against the coordinator (issue 17): no one site may hold more than
    # this share of the FedAvg weight, whatever ``num-examples`` it claims
    # (raised to 1/K when K sites answer, which is equal weighting).
    max_site_weight: float = Field(0.5, alias="max-site-weight", gt=0, le=1)
    # Hostile sites (issue 32): the most patients any one site's reply may
    # claim (num-examples, validation counts, fingerprint case counts); a reply
    # claiming more is rejected, so no count can overflow a weighted mean.
    max_site_examples: int = Field(
        100_000, alias="max-site-examples", ge=1, le=10_000_000
    )
    fedbn: bool = False
    fine_tune_steps: int = Field(0, alias="fine-tune-steps", ge=0, le=100_000)
    # After the last round of a segmentation run: the post-processing rule and
    # the out-of-distribution threshold, chosen from the sites' aggregates
    # (server/clinical_round.py; two evaluate requests per site).
    clinical_calibration: bool = Field(True, alias="clinical-calibration")
    # Start from a pretrained model (``kidneyfl pretrain``; a checkpoint folder)
    # instead of the seeded initialisation; its provenance goes into every
    # checkpoint's sidecar.
    initial_checkpoint: str = Field("", alias="initial-checkpoint")
    out_dir: str = Field("runs", alias="out-dir")
    run_name: str = Field("", alias="run-name")
    resume: bool = False
    sim_site_configs: str = Field("", alias="sim-site-configs")
    # Deployment liveness: before round 1 the coordinator waits up to
    # site-wait-timeout seconds for expected-sites (0: min-sites) to connect,
    # then starts if min-sites are online; later, if fewer than min-sites stay
    # online that long, it stops with the completed rounds checkpointed.
    expected_sites: int = Field(0, alias="expected-sites", ge=0)
    site_wait_timeout: float = Field(600.0, alias="site-wait-timeout", gt=0)
    # Evaluation (issue 6): surface Dice tolerance in mm per KiTS region
    # (kidney+masses, masses, tumour); KiTS23's values by default.
    surface_dice_tolerance_mm: tuple[float, float, float] = Field(
        (1.033, 1.133, 1.150), alias="surface-dice-tolerance-mm"
    )

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        return check_run_name(v) if v else v  # "": the coordinator names it

    @field_validator("out_dir")
    @classmethod
    def _out_dir(cls, v: str) -> str:
        return check_out_dir(v)

    @model_validator(mode="after")
    def _mixed_without_pooled_intensities(self) -> Plan:
        # The fingerprint round pools every site's foreground intensities into
        # one HU window and z-score: with MR sites in the pool, CT sites would
        # be normalised with MR's arbitrary units (docs/mixed-modality.md).
        if self.modality == "mixed" and self.fingerprint_round:
            raise ValueError(
                "fingerprint-round pools intensity statistics over all sites, "
                "which mixes CT's HU with MR's arbitrary units under modality = "
                '"mixed"; set fingerprint-round = false (each MR scan is '
                "normalised within its own body, CT keeps the plan's hu-window)"
            )
        return self

    @field_validator("ema_decay")
    @classmethod
    def _ema_decay(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(
                f"ema-decay must be at least 0 and below 1, got {v}; 0 turns the "
                "average off, 0.9 weights the newest global model by 0.1"
            )
        return v

    @field_validator("lr_min_factor")
    @classmethod
    def _lr_min_factor(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(
                f"lr-min-factor must be above 0 and at most 1, got {v}: the last "
                "round's learning rate is learning-rate x lr-min-factor, e.g. 0.1"
            )
        return v

    @field_validator("spacing_mm", mode="before")
    @classmethod
    def _spacing(cls, v: Any) -> tuple:
        t = _triple(v, float, "spacing-mm")
        if not all(0.2 <= s <= 10 for s in t):
            raise ValueError("spacing-mm values must be between 0.2 and 10 mm")
        return t

    @field_validator("surface_dice_tolerance_mm", mode="before")
    @classmethod
    def _tolerance(cls, v: Any) -> tuple:
        t = _triple(v, float, "surface-dice-tolerance-mm")
        if not all(0 <= s <= 50 for s in t):
            raise ValueError(
                "surface-dice-tolerance-mm values must be between 0 and 50 mm, "
                "e.g. 1.033,1.133,1.150 (KiTS23)"
            )
        return t

    @field_validator("patch_size", mode="before")
    @classmethod
    def _patch(cls, v: Any) -> tuple:
        t = _triple(v, int, "patch-size")
        if not all(16 <= s <= 512 and s % 16 == 0 for s in t):
            raise ValueError("patch-size values must be multiples of 16 from 16 to 512")
        return t

    @field_validator("patch_class_ratios", mode="before")
    @classmethod
    def _ratios(cls, v: Any) -> tuple:
        parts = _numbers(v)
        if len(parts) != 4 or not all(float(p) >= 0 for p in parts):
            raise ValueError(
                "patch-class-ratios needs four non-negative numbers (background, "
                "kidney, tumour, cyst), e.g. 1,1,2,1"
            )
        if sum(float(p) for p in parts) <= 0:
            raise ValueError("patch-class-ratios needs at least one positive ratio")
        return tuple(float(p) for p in parts)

    @field_validator("hu_window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> tuple:
        parts = (
            [float(p) for p in str(v).replace(" ", "").split(",") if p]
            if isinstance(v, str)
            else [float(p) for p in v]
        )
        if len(parts) != 2 or parts[0] >= parts[1]:
            raise ValueError(
                "hu-window needs 'low,high' with low < high, e.g. -150,350"
            )
        return tuple(parts)

    @model_validator(mode="after")
    def _robust_needs_sites(self) -> Plan:
        # Flower's robust rules silently skip aggregation with too few replies;
        # say so up front instead.
        f = self.num_malicious_sites
        need = {"krum": f + 3, "multikrum": f + 3, "bulyan": 4 * f + 3}
        if self.strategy in need and self.min_sites < need[self.strategy]:
            raise ValueError(
                f"strategy {self.strategy} with num-malicious-sites={f} needs at "
                f"least {need[self.strategy]} updates per round; set min-sites >= "
                f"{need[self.strategy]} or lower num-malicious-sites"
            )
        if self.strategy == "multikrum" and self.krum_select > self.min_sites - f:
            raise ValueError(
                f"krum-select={self.krum_select} is more than min-sites - "
                f"num-malicious-sites ({self.min_sites - f}); lower krum-select"
            )
        return self

    @property
    def site_config_paths(self) -> list[Path]:
        """Site YAMLs of a local simulation, one virtual hospital each."""
        return [Path(p) for p in self.sim_site_configs.split(",") if p.strip()]

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to resume under this plan.

        The model and its input, the strategy with every option it reads (a
        server optimiser's moments belong to its learning rate and betas), and
        FedBN (which layers stay at the sites). Rounds, timeouts, the sites'
        local training and the privacy target may change on resume.
        """
        keep = ("task", "model", "spacing_mm", "patch_size", "hu_window", "strategy")
        keep += ("class_names", "image_size")  # the classifier's outputs and input
        keep += RESUME_STRATEGY_KEYS
        return {k: getattr(self, k) for k in keep}


# Added to the resume fingerprint after checkpoints without them were written:
# a checkpoint that lacks one was made under the key's default (see
# server/checkpoint.load_checkpoint).
RESUME_STRATEGY_KEYS: tuple[str, ...] = (
    "fedbn",
    "proximal_mu",
    "server_learning_rate",
    "server_momentum",
    "server_beta_1",
    "server_beta_2",
    "server_tau",
    "trimmed_beta",
    "num_malicious_sites",
    "krum_select",
    "central_dp",
    "central_dp_noise",
    "central_dp_clip",
    "ema_decay",  # the average saved with a checkpoint belongs to its decay
    "modality",  # a CT model does not resume as an MR one (issue 29)
)


def load_plan(run_config: Mapping[str, Any], source: str = "run config") -> Plan:
    """Validate a run config (``context.run_config``) into a :class:`Plan`.

    Raises
    ------
    ConfigError
        Naming the key, the problem and the fix.
    """
    try:
        return Plan.model_validate(dict(run_config))
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source, plan=True)) from None


# The site's schema lives in its own module; ``common.config`` stays the one
# place both sides import configuration from.
from common.site_config import (  # noqa: E402
    DataConfig,
    FederationConfig,
    GovernanceConfig,
    PhantomConfig,
    PrivacyConfig,
    SiteConfig,
    load_site_config,
)

__all__ = [
    "MAX_SURVIVAL_HORIZONS",
    "MAX_SURVIVAL_INTERVALS",
    "RUN_NAME_PATTERN",
    "SGD_MOMENTUM",
    "ConfigError",
    "DataConfig",
    "FederationConfig",
    "GovernanceConfig",
    "PhantomConfig",
    "Plan",
    "PrivacyConfig",
    "SiteConfig",
    "check_out_dir",
    "check_run_name",
    "load_plan",
    "load_site_config",
    "run_folder",
]


def privacy_run_id(name: str, plan: Plan) -> str:
    """The run id the sites account under: the run's name and its schedule.

    A site binds a run's noise to the schedule it was calibrated for and
    refuses the same id with another (client/privacy/ledger.py). A resume
    with the same plan keeps the id (and the sites' calibration); one that
    changes the rounds, epochs, batch size, target or fine-tune steps is a
    new privacy run at the sites, calibrated for its own schedule.
    """
    keys = ("num_server_rounds", "local_epochs", "batch_size", "dp_target_epsilon")
    schedule = [getattr(plan, k) for k in (*keys, "fine_tune_steps")]
    digest = hashlib.sha256(repr(schedule).encode()).hexdigest()[:8]
    plain = re.sub(r"[^A-Za-z0-9_.:@+-]", "_", name[:110]).lstrip("_.:@+-") or "run"
    return f"{plain}.{digest}"
