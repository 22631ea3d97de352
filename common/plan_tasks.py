"""The task sections of the federation plan: classification and prognosis.

:class:`TaskOptions` holds the plan keys that only the classification task
(issue 8; docs/classification.md) and the prognosis task (issue 30;
docs/prognosis.md) read, with their checks; :class:`common.config.Plan`
inherits them, so a plan is still one flat model of kebab-case keys. Each
task ignores the other's keys, and segmentation ignores both.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.config_base import _numbers

# Prognosis (issue 30): bounds on what a plan may ask of a site's outcomes.
MAX_SURVIVAL_INTERVALS = 20
MAX_SURVIVAL_HORIZONS = 4
MAX_SURVIVAL_DAYS = 36_500.0  # a century of follow-up
PROGNOSIS_COVARIATES = ("age", "sex", "size", "radiomics")


def days_list(v: Any, key: str) -> tuple[float, ...]:
    """A plan's list of days: positive, finite, strictly increasing, at most
    :data:`MAX_SURVIVAL_INTERVALS` values and :data:`MAX_SURVIVAL_DAYS` each.

    Raises
    ------
    ValueError
        Naming ``key`` and the fix.
    """
    try:
        days = tuple(float(p) for p in _numbers(v))
    except (TypeError, ValueError):
        days = ()
    top = MAX_SURVIVAL_INTERVALS if "edges" in key else MAX_SURVIVAL_HORIZONS
    if (
        not days
        or len(days) > top
        or not all(math.isfinite(d) and 0 < d <= MAX_SURVIVAL_DAYS for d in days)
        or any(b <= a for a, b in zip(days, days[1:], strict=False))
    ):
        raise ValueError(
            f"{key} must be 1 to {top} increasing positive numbers of days, at "
            f"most {MAX_SURVIVAL_DAYS:g}, comma-separated, e.g. 365,1095"
        )
    return days


class TaskOptions(BaseModel):
    """The classification and prognosis keys of a :class:`common.config.Plan`."""

    # as Plan's: unknown keys, NaN and infinity are refused
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False
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
    # Prognosis task (issue 30; docs/prognosis.md). Ignored by the others.
    # Right edges in days of the discrete-time model's intervals (the
    # network's outputs); the horizons of the time-dependent AUC, calibration
    # at the last; the covariates beside the scan; the crop around the tumour.
    survival_edges_days: tuple[float, ...] = Field(
        (180.0, 365.0, 730.0, 1095.0, 1460.0, 1825.0), alias="survival-edges-days"
    )
    survival_horizons_days: tuple[float, ...] = Field(
        (365.0, 1095.0), alias="survival-horizons-days"
    )
    prognosis_covariates: tuple[str, ...] = Field(
        ("age", "sex", "size", "radiomics"), alias="prognosis-covariates"
    )
    prognosis_crop_mm: float = Field(160.0, alias="prognosis-crop-mm", ge=32, le=512)
    prognosis_crop_voxels: int = Field(32, alias="prognosis-crop-voxels", ge=8, le=64)

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

    @field_validator("survival_edges_days", "survival_horizons_days", mode="before")
    @classmethod
    def _days(cls, v: Any, info: Any) -> tuple:
        return days_list(v, info.field_name.replace("_", "-"))

    @field_validator("prognosis_covariates", mode="before")
    @classmethod
    def _covariates(cls, v: Any) -> tuple:
        names = v.split(",") if isinstance(v, str) else list(v)
        names = [str(n).strip() for n in names if str(n).strip()]
        if names == ["none"]:
            return ()
        bad = sorted(set(names) - set(PROGNOSIS_COVARIATES))
        if bad or len(set(names)) != len(names):
            raise ValueError(
                "prognosis-covariates is a comma-separated subset of "
                f"{','.join(PROGNOSIS_COVARIATES)} without repeats, or none"
            )
        return tuple(names)

    @model_validator(mode="after")
    def _horizons_within_edges(self) -> TaskOptions:
        if self.survival_horizons_days[-1] > self.survival_edges_days[-1]:
            raise ValueError(
                "survival-horizons-days must not go past the last of "
                "survival-edges-days (the model predicts nothing beyond it)"
            )
        return self

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weights(cls, v: Any) -> tuple:
        weights = tuple(float(p) for p in _numbers(v))
        if not all(w > 0 for w in weights):
            raise ValueError("class-weights must be positive numbers, e.g. 1,2,2,4")
        return weights

    @model_validator(mode="after")
    def _weights_match_classes(self) -> TaskOptions:
        if self.class_weights and len(self.class_weights) != len(self.class_names):
            raise ValueError(
                f"class-weights has {len(self.class_weights)} values but class-names "
                f"has {len(self.class_names)}; give one weight per class or leave "
                "class-weights empty to derive them from each site's counts"
            )
        return self
