"""A hospital's site YAML: where its data are, its device, its privacy budget.

The schema (``SiteConfig``) and its loader; it never leaves the site. Errors
name the file, the key and the fix; unknown keys are errors.
"""

from __future__ import annotations

import math
import re
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

from common.config_base import ConfigError, _explain

# The modalities a site's scans may be (``data.modality``).
MODALITIES = ("CT", "MR")


class PrivacyConfig(BaseModel):
    """The site's own privacy budget. The coordinator cannot raise it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

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
    # The site's own limits on what one run may ask of it (issue 27,
    # docs/privacy.md). Every number a coordinator's request carries that
    # decides what is spent is checked against these before anything is
    # calibrated, spent or trained; a request past one is refused.
    # max_epsilon_per_run: the most one run may spend (default: max_epsilon).
    max_epsilon_per_run: float | None = Field(None, gt=0)
    # The least noise multiplier any DP-SGD step runs with: a calibration that
    # comes out lower is raised to it (more noise, less epsilon than targeted).
    min_noise_multiplier: float = Field(0.3, gt=0, le=100)
    max_rounds_per_run: int = Field(100, ge=1, le=10_000)
    max_local_epochs: int = Field(50, ge=1, le=1000)
    max_fine_tune_steps: int = Field(1000, ge=0, le=100_000)
    # Evaluate and fingerprint-query requests one run may make: each answer is
    # a release of aggregates (not covered by DP), so their number is bounded.
    max_queries_per_run: int = Field(250, ge=1, le=100_000)

    @model_validator(mode="after")
    def _budget_needed(self) -> PrivacyConfig:
        if self.enabled and (self.max_epsilon is None or self.delta is None):
            raise ValueError(
                "with privacy enabled, set both privacy.max_epsilon (the most this "
                "site will ever spend) and privacy.delta (e.g. 1/(10 x cases)); to "
                "train without DP set privacy.enabled: false explicitly"
            )
        if (
            self.max_epsilon_per_run is not None
            and self.max_epsilon is not None
            and self.max_epsilon_per_run > self.max_epsilon
        ):
            raise ValueError(
                "privacy.max_epsilon_per_run is above privacy.max_epsilon; one run "
                "can never spend more than the site's lifetime ceiling: lower it or "
                "leave it out (it then equals max_epsilon)"
            )
        return self

    @property
    def run_epsilon_cap(self) -> float:
        """The most one run may spend: ``max_epsilon_per_run``, else the ceiling."""
        if self.max_epsilon_per_run is not None:
            return self.max_epsilon_per_run
        return self.max_epsilon if self.max_epsilon is not None else math.inf


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
    # What the scans are (issue 29, docs/mr.md): CT in Hounsfield units or MR
    # (arbitrary units). It picks the preprocessing and the scan checks; a plan
    # for the other modality is refused (a "mixed" plan takes either).
    modality: Literal["CT", "MR"] = "CT"

    @field_validator("modality", mode="before")
    @classmethod
    def _modality(cls, v: Any) -> Any:
        if v not in MODALITIES:
            raise ValueError(
                f"{str(v)[:40]!r} is not a modality kidneyfl reads: write "
                f"{' or '.join(MODALITIES)} (CT in Hounsfield units; MR in the "
                "scanner's own units), in capitals"
            )
        return v


class PhantomConfig(BaseModel):
    """Synthetic data for demos: which scanner profile this virtual site models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str
    cases: int = Field(16, ge=2, le=2000)
    seed: int = 0
    scale: float | None = Field(None, gt=0, le=20)  # None: the phantom default
    # Profile fields replaced for this site, e.g. {tumour_median_diameter_mm: 55}
    # (segmentation; checked against the profile's fields when data are written)
    overrides: dict[str, float | str] | None = None
    # Classification phantoms (issue 8): labelled slices instead of KiTS volumes,
    # drawn with this class mix (relative weights; default equal).
    # Prognosis phantoms (issue 30): segmentation phantoms plus outcomes from
    # a survival generator with a known hazard (sim/phantoms/survival.py).
    task: Literal["segmentation", "classification", "prognosis"] = "segmentation"
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

    @model_validator(mode="after")
    def _overrides_segmentation(self) -> PhantomConfig:
        if self.overrides and self.task == "classification":
            raise ValueError(
                "phantom.overrides changes a scanner profile of segmentation "
                "phantoms; remove it for task: classification (use class_mix)"
            )
        return self


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
