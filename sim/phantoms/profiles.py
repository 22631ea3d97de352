"""Simulated hospitals: scanner and case-mix profiles, and the phantom's grid.

A :class:`SiteProfile` describes one hospital's scanner (slice thickness,
in-plane spacing, noise, contrast phase, intensity offset) and case mix
(tumour and cyst prevalence); :data:`PROFILES` holds the three built-in CT
scanners, :data:`MR_PROFILES` the MR one (issue 29, ``modality: MR``: T2-like
intensities, :mod:`sim.phantoms.mr`), and :func:`load_profile` reads a custom
one from YAML/JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from common.metrics import LABELS as KIDNEYFL_LABELS

DEFAULT_SCALE = 2.5
PHANTOM_VERSION = 1  # bump when the anatomy changes, so old site dirs read as stale
LABELS = KIDNEYFL_LABELS  # re-exported: phantom.json records the label names
FOV_MM = (340.0, 260.0, 170.0)
TUMOUR_MAX_DIAMETER_MM = 90.0
# Tumour size fields added after the first phantoms: left out of a dump at these
# defaults, so phantom.json of a profile that does not set them is unchanged.
_TUMOUR_SIZE_DEFAULTS = {
    "tumour_median_diameter_mm": 40.0,
    "tumour_min_diameter_mm": 15.0,
}
# The modality field came later too: a CT profile's dump leaves it out.
_DUMP_DEFAULTS = {**_TUMOUR_SIZE_DEFAULTS, "modality": "CT"}
IMAGE_NAME, SEGMENTATION_NAME = "imaging.nii.gz", "segmentation.nii.gz"
# dcm2niix's BIDS sidecar beside an MR image: {"Modality": "MR", ...}
SIDECAR_NAME = "imaging.json"
METADATA_NAME = "phantom.json"


class SiteProfile(BaseModel):
    """Scanner and case-mix description of one (simulated) hospital site.

    For an MR profile (``modality: MR``) ``noise_hu`` is the Rician noise's sigma
    in the image's arbitrary units, and ``phase`` and ``intensity_offset_hu``
    are not used (contrast phases are CT's).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    slice_thickness_mm: float = Field(ge=0.5, le=5.0)
    inplane_spacing_mm: float = Field(ge=0.6, le=1.0)
    noise_hu: float = Field(ge=0.0, le=50.0)
    phase: Literal["corticomedullary", "nephrographic"]
    intensity_offset_hu: float = Field(default=0.0, ge=-50.0, le=50.0)
    modality: Literal["CT", "MR"] = "CT"
    tumour_prevalence: float = Field(default=0.9, ge=0.0, le=1.0)
    cyst_prevalence: float = Field(default=0.3, ge=0.0, le=1.0)
    # The tumour's diameter is log-normal around the median (sigma 0.4),
    # clipped to [min, 90 mm]; the defaults are the original phantoms'.
    tumour_median_diameter_mm: float = Field(default=40.0, ge=10.0, le=80.0)
    tumour_min_diameter_mm: float = Field(default=15.0, ge=5.0, le=80.0)

    @model_validator(mode="after")
    def _min_below_median(self) -> SiteProfile:
        if self.tumour_min_diameter_mm > self.tumour_median_diameter_mm:
            raise ValueError(
                f"tumour_min_diameter_mm ({self.tumour_min_diameter_mm}) is above "
                f"tumour_median_diameter_mm ({self.tumour_median_diameter_mm}); "
                "lower the minimum or raise the median"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        out = handler(self)
        for key, default in _DUMP_DEFAULTS.items():
            if out.get(key) == default:
                del out[key]
        return out


# thin-slice-cm is 1.25 mm / 0.78 mm rather than 1.0 / 0.7 so that a case at the
# default scale stays under ~1.5 M voxels (1.0 / 0.7 would give ~2 M).
PROFILES: dict[str, SiteProfile] = {
    p.name: p
    for p in (
        SiteProfile(
            name="thin-slice-cm",
            slice_thickness_mm=1.25,
            inplane_spacing_mm=0.78,
            noise_hu=12.0,
            phase="corticomedullary",
        ),
        SiteProfile(
            name="standard-nephro",
            slice_thickness_mm=2.5,
            inplane_spacing_mm=0.8,
            noise_hu=15.0,
            phase="nephrographic",
            intensity_offset_hu=20.0,
        ),
        SiteProfile(
            name="thick-slice-noisy",
            slice_thickness_mm=5.0,
            inplane_spacing_mm=0.95,
            noise_hu=20.0,
            phase="nephrographic",
            intensity_offset_hu=-25.0,
            tumour_prevalence=0.7,
            cyst_prevalence=0.5,
        ),
    )
}


# MR sites (issue 29): a T2-weighted, fat-suppressed abdominal series (the
# kidney's MR protocol), 4 mm slices. Kept apart from PROFILES, which lists the
# CT scanners whose dumps (phantom.json) must stay as they were.
MR_PROFILES: dict[str, SiteProfile] = {
    p.name: p
    for p in (
        SiteProfile(
            name="mr-t2",
            modality="MR",
            slice_thickness_mm=4.0,
            inplane_spacing_mm=1.0,
            noise_hu=12.0,
            phase="nephrographic",
            cyst_prevalence=0.4,
        ),
    )
}


def builtin_profiles() -> dict[str, SiteProfile]:
    """Every built-in profile by name: the CT scanners, then the MR ones."""
    return {**PROFILES, **MR_PROFILES}


def voxel_spacing(
    profile: SiteProfile, scale: float = DEFAULT_SCALE
) -> tuple[float, float, float]:
    """Return the voxel size (mm along x, y, z) written for ``profile``.

    Parameters
    ----------
    profile : SiteProfile
        Site whose native scanner spacing is scaled.
    scale : float
        Multiplier on the native spacing; 1.0 is the scanner's own grid.

    Returns
    -------
    tuple of float
        Rounded to 1e-6 mm so that header round-trips compare cleanly.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    inplane = round(profile.inplane_spacing_mm * scale, 6)
    return (inplane, inplane, round(profile.slice_thickness_mm * scale, 6))


def load_profile(name_or_path: str) -> SiteProfile:
    """Return a built-in profile by name, or load one from a YAML/JSON file.

    Parameters
    ----------
    name_or_path : str
        A key of :data:`PROFILES` or :data:`MR_PROFILES`, or a
        ``.yaml``/``.yml``/``.json`` file with the :class:`SiteProfile` fields
        (``name`` defaults to the file stem).

    Raises
    ------
    ValueError
        Unknown name (the message lists the built-ins), or invalid file contents
        (the message names the offending field).
    """
    builtin = builtin_profiles()
    if name_or_path in builtin:
        return builtin[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"{name_or_path!r} is neither a built-in site profile "
            f"({', '.join(sorted(builtin))}) nor an existing YAML/JSON file"
        )
    try:
        text = path.read_text()
        is_yaml = path.suffix.lower() in (".yaml", ".yml")
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot parse site profile {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"site profile {path} must be a mapping of fields")
    data.setdefault("name", path.stem)
    try:
        return SiteProfile.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"invalid site profile {path}: {exc}") from exc
