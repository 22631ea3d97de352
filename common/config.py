"""Configuration schemas: the federation plan and a site's YAML.

Validated once, here, at the boundary. Errors name the file, the key and the fix;
unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration file or plan is invalid; the message says how to fix it."""


def _triple(value: Any, kind: type, name: str) -> tuple:
    """Parse ``"a,b,c"`` (run config has no lists) or a sequence into a 3-tuple."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", ",").split(",") if p]
    else:
        parts = list(value)
    if len(parts) != 3:
        raise ValueError(f"{name} needs three comma-separated numbers, got {value!r}")
    return tuple(kind(p) for p in parts)


# Flower's own strategies a plan may name (server/aggregators.py builds them).
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
# coordinator's update guard predicts DP noise with it (server/influence.py).
SGD_MOMENTUM = 0.9


class Plan(BaseModel):
    """The federation plan, shared by the coordinator and every site.

    Built from Flower's run config (``[tool.flwr.app.config]``), whose keys are
    kebab-case; field aliases keep those names.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    task: Literal["segmentation", "classification"] = "segmentation"
    model: str = "unet-small"
    strategy: StrategyName = "fedavg"
    num_server_rounds: int = Field(4, alias="num-server-rounds", ge=1, le=10_000)
    local_epochs: int = Field(1, alias="local-epochs", ge=1, le=1000)
    batch_size: int = Field(4, alias="batch-size", ge=1, le=512)
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(0.003, alias="learning-rate", gt=0, le=10)
    spacing_mm: tuple[float, float, float] = Field((3.0, 3.0, 4.0), alias="spacing-mm")
    patch_size: tuple[int, int, int] = Field((64, 64, 32), alias="patch-size")
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
    fedbn: bool = False
    fine_tune_steps: int = Field(0, alias="fine-tune-steps", ge=0, le=100_000)
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
    # Classification task (issue 8; docs/classification.md). Ignored by
    # segmentation. Class order defines the network's outputs.
    class_names: tuple[str, ...] = Field(
        ("normal", "cyst", "tumour", "stone"), alias="class-names"
    )
    class_balance: Literal["loss", "sampler", "none"] = Field(
        "loss", alias="class-balance"
    )
    class_weights: tuple[float, ...] = Field((), alias="class-weights")
    image_size: int = Field(64, alias="image-size", ge=16, le=1024)

    @field_validator("class_names", mode="before")
    @classmethod
    def _class_names(cls, v: Any) -> tuple:
        names = (
            [p.strip() for p in v.split(",") if p.strip()]
            if isinstance(v, str)
            else [str(p).strip() for p in v]
        )
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(
                "class-names needs at least two distinct comma-separated names, "
                "e.g. normal,cyst,tumour,stone"
            )
        if not all(re.fullmatch(r"[a-z0-9][a-z0-9_]*", n) for n in names):
            raise ValueError(
                "class-names may use lower-case letters, digits and _ only "
                "(they become metric keys such as recall-<name>)"
            )
        return tuple(names)

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weights(cls, v: Any) -> tuple:
        parts = (
            [p for p in v.replace(" ", ",").split(",") if p]
            if isinstance(v, str)
            else list(v)
        )
        weights = tuple(float(p) for p in parts)
        if not all(w > 0 for w in weights):
            raise ValueError("class-weights must be positive numbers, e.g. 1,2,2,4")
        return weights

    @model_validator(mode="after")
    def _weights_match_classes(self) -> Plan:
        if self.class_weights and len(self.class_weights) != len(self.class_names):
            raise ValueError(
                f"class-weights has {len(self.class_weights)} values but class-names "
                f"has {len(self.class_names)}; give one weight per class or leave "
                "class-weights empty to derive them from each site's counts"
            )
        return self

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
        if not all(s >= 16 and s % 16 == 0 for s in t):
            raise ValueError("patch-size values must be multiples of 16 (>= 16)")
        return t

    @field_validator("patch_class_ratios", mode="before")
    @classmethod
    def _ratios(cls, v: Any) -> tuple:
        parts = (
            [p for p in v.replace(" ", ",").split(",") if p]
            if isinstance(v, str)
            else list(v)
        )
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


class PrivacyConfig(BaseModel):
    """The site's own privacy budget. The coordinator cannot raise it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    max_epsilon: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)
    # What the site chooses to release beyond DP-protected weights (docs/privacy.md):
    # validation metrics (means over validation patients, not covered by DP),
    # the dataset fingerprint for a federated preprocessing plan, and the
    # smallest number of patients any released aggregate may describe. The
    # coordinator may ask for a larger floor, never a smaller one.
    share_validation_metrics: bool = True
    share_fingerprint: bool = True
    min_cases_for_aggregates: int = Field(5, ge=1, le=100_000)

    @model_validator(mode="after")
    def _budget_needed(self) -> PrivacyConfig:
        if self.enabled and (self.max_epsilon is None or self.delta is None):
            raise ValueError(
                "with privacy enabled, set both privacy.max_epsilon (the most this "
                "site will ever spend) and privacy.delta (e.g. 1/(10 x cases)); to "
                "train without DP set privacy.enabled: false explicitly"
            )
        return self


class DataConfig(BaseModel):
    """Where the site's images are and how cases are split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path
    layout: Literal[
        "auto",
        "kits19",
        "kits21",
        "kits23",
        "msd",
        "nnunet",
        "manifest",
        "class-folders",  # classification: <root>/<class>/<image> (issue 8)
    ] = "auto"
    # dataset label name -> kidneyfl name (background, kidney, tumour, cyst)
    label_names: dict[str, str] | None = None
    manifest: Path | None = None  # CSV image,label[,split]; default root/manifest.csv
    validation_fraction: float = Field(0.25, ge=0, lt=1)
    split_seed: int = 0
    train_cases: list[str] | None = None
    validation_cases: list[str] | None = None
    # cases (or patient ids) the site leaves out of training and validation
    exclude_cases: list[str] | None = None


class PhantomConfig(BaseModel):
    """Synthetic data for demos: which scanner profile this virtual site models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str
    cases: int = Field(16, ge=2, le=2000)
    seed: int = 0
    scale: float | None = Field(None, gt=0, le=20)  # None: the phantom default
    # Classification phantoms (issue 8): labelled slices instead of KiTS volumes,
    # drawn with this class mix (relative weights; default equal).
    task: Literal["segmentation", "classification"] = "segmentation"
    class_mix: dict[str, float] | None = None

    @field_validator("class_mix")
    @classmethod
    def _mix(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and (
            not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0
        ):
            raise ValueError(
                "class_mix needs non-negative weights per class with a positive "
                "sum, e.g. {normal: 1, cyst: 1, tumour: 1, stone: 4}"
            )
        return v


class FederationConfig(BaseModel):
    """How the site's SuperNode reaches the coordinator (``kidneyfl site start``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    superlink: str = Field(pattern=r"^[A-Za-z0-9_.\[\]:-]+:[0-9]{1,5}$")
    root_certificates: Path | None = None  # the consortium's ca.crt
    auth_key: Path | None = None  # this site's private node key (never sent)
    insecure: bool = False  # plaintext: development only, never across sites
    clientappio_port: int = Field(9094, ge=1, le=65535)
    # Keep one idle ClientApp process with torch/MONAI/Opacus already imported,
    # so a message does not wait for those imports (governed sites only; costs
    # the memory of one idle process).
    warm_clientapp: bool = True

    @model_validator(mode="after")
    def _tls_needed(self) -> FederationConfig:
        if not self.insecure and self.root_certificates is None:
            raise ValueError(
                "set federation.root_certificates to the consortium's ca.crt "
                "(TLS), or federation.insecure: true for a local test only"
            )
        return self


# -- Governance (issue 10): which app bundles may run at the site ------------
SHA256_HEX = r"^[0-9a-f]{64}$"


class GovernanceConfig(BaseModel):
    """The site's own list of reviewed app bundles (SHA-256 of the ``.fab``).

    Approval is on unless the YAML switches it off explicitly; it is enforced by
    the site's executor (``kidneyfl site executor``), not by the bundle's code.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    require_approval: bool = True
    approved_apps: list[str] = Field(default_factory=list)

    @field_validator("approved_apps", mode="before")
    @classmethod
    def _hashes(cls, v: Any) -> list[str]:
        out = []
        for h in v or []:
            h = str(h).strip().lower().removeprefix("sha256:")
            if not re.fullmatch(SHA256_HEX, h):
                raise ValueError(
                    f"{h!r} is not a SHA-256 hex digest (64 hex characters); add "
                    "bundles with `kidneyfl site approve SITE_YAML BUNDLE.fab`"
                )
            out.append(h)
        return out


class SiteConfig(BaseModel):
    """One hospital's site YAML. It never leaves the site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    data: DataConfig
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads torch may use for this site's work; default: all cores. Set
    # it when the machine is shared (with other sites or jobs): threads beyond
    # the cores the site really has make every step slower, not faster.
    cpu_threads: int | None = Field(None, ge=1, le=1024)
    state_dir: Path
    privacy: PrivacyConfig
    phantom: PhantomConfig | None = None
    federation: FederationConfig | None = None
    governance: GovernanceConfig = Field(default_factory=GovernanceConfig)
    source: Path | None = Field(None, exclude=True)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML; relative paths resolve against its folder.

    Raises
    ------
    ConfigError
        If the file is missing, not YAML, or has unknown keys or bad values.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: site config not found; pass the path of the YAML")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (name, data, ...)")
    base = path.resolve().parent
    try:
        site = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, str(path), plan=False)) from None
    data = site.data.model_copy(
        update={
            "root": _resolve(base, site.data.root),
            "manifest": _resolve(base, site.data.manifest)
            if site.data.manifest
            else None,
        }
    )
    fed = site.federation
    if fed is not None:
        fed = fed.model_copy(
            update={
                k: _resolve(base, getattr(fed, k))
                for k in ("root_certificates", "auth_key")
                if getattr(fed, k) is not None
            }
        )
    return site.model_copy(
        update={
            "data": data,
            "federation": fed,
            "state_dir": _resolve(base, site.state_dir),
            "source": path.resolve(),
        }
    )


def _resolve(base: Path, p: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _explain(exc: ValidationError, source: str, plan: bool) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if plan:
            loc = loc.replace("_", "-")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            where = "[tool.flwr.app.config]" if plan else "the site schema"
            msg = f"unknown key; remove it or check the spelling against {where}"
        elif err["type"] == "missing":
            msg = "required key is missing; add it"
        lines.append(f"  - {loc or '(top level)'}: {msg}")
    return "\n".join(lines)
