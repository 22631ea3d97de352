"""The utility benchmark's phantom hospitals and public set, defined once.

Three non-IID hospitals, each a scanner profile of :mod:`sim.phantoms.profiles`
with its own case mix, and tumours large enough for the benchmark's 4-5 mm
grid to resolve (median diameter 55 mm, at least 30 mm: six or more voxels
across). Each hospital's cases come from one generator seed and are split by
case id into three disjoint lists: ``train`` (trained on), ``validation`` (the
split the benchmark reports) and ``tuning`` (for choosing recipe settings,
never reported). Every case has its own generator seed
(:func:`sim.phantoms.kits_writer.case_seed`), so the splits share no patient.
The "public" set, for pretraining, is a fourth scanner profile that no
hospital uses, with another seed.

:func:`write_data` writes the cases (idempotent); :func:`site_yaml` writes a
site YAML for one split, privacy setting and state folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from sim.phantoms.kits_writer import write_site
from sim.phantoms.profiles import PROFILES, SiteProfile

SCALE = 4.0  # written at 4x the scanner spacing: 3-4 mm in-plane, as the plan's grid
SPLITS = ("validation", "tuning")
DELTA = 1e-3
_LARGE_TUMOURS = {"tumour_median_diameter_mm": 55.0, "tumour_min_diameter_mm": 30.0}


def _hospital(base: str, tumour: float, cyst: float) -> SiteProfile:
    return PROFILES[base].model_copy(
        update={
            "name": f"utility-{base}",
            "tumour_prevalence": tumour,
            "cyst_prevalence": cyst,
            **_LARGE_TUMOURS,
        }
    )


# name -> (profile, generator seed): scanners and case mixes differ
HOSPITALS: dict[str, tuple[SiteProfile, int]] = {
    "hospital-thin": (_hospital("thin-slice-cm", 0.9, 0.2), 101),
    "hospital-standard": (_hospital("standard-nephro", 0.8, 0.35), 202),
    "hospital-thick": (_hospital("thick-slice-noisy", 0.7, 0.5), 303),
}
PUBLIC_NAME = "public-archive"
PUBLIC: tuple[SiteProfile, int] = (
    SiteProfile(
        name="utility-public-archive",
        slice_thickness_mm=3.0,
        inplane_spacing_mm=0.7,
        noise_hu=10.0,
        phase="corticomedullary",
        intensity_offset_hu=10.0,
        tumour_prevalence=0.8,
        cyst_prevalence=0.3,
        **_LARGE_TUMOURS,
    ),
    404,
)


@dataclass(frozen=True)
class Sizes:
    """Cases per hospital and split, and of the public set."""

    train: int = 120
    validation: int = 40
    tuning: int = 20
    public: int = 150

    @property
    def per_site(self) -> int:
        """Cases written per hospital (all three splits)."""
        return self.train + self.validation + self.tuning

    def cases(self, split: str) -> list[str]:
        """Case ids of ``split`` (``train``, ``validation`` or ``tuning``)."""
        bounds = {
            "train": (0, self.train),
            "validation": (self.train, self.validation),
            "tuning": (self.train + self.validation, self.tuning),
        }
        if split not in bounds:
            raise ValueError(f"unknown split {split!r}; use {', '.join(bounds)}")
        start, n = bounds[split]
        return [f"case_{i:05d}" for i in range(start, start + n)]


FULL = Sizes()
QUICK = Sizes(train=6, validation=3, tuning=2, public=6)


def data_root(work: Path, name: str, n_cases: int) -> Path:
    """Where a hospital's (or the public set's) cases lie; the count is in the
    name, so quick and full data never collide."""
    return work / "data" / f"{name}-{n_cases}"


def write_data(work: Path, sizes: Sizes) -> None:
    """Write every hospital's cases and the public set's (complete cases of an
    earlier call are kept)."""
    for name, (profile, seed) in HOSPITALS.items():
        write_site(
            data_root(work, name, sizes.per_site), profile, sizes.per_site, seed, SCALE
        )
    profile, seed = PUBLIC
    write_site(
        data_root(work, PUBLIC_NAME, sizes.public), profile, sizes.public, seed, SCALE
    )


def privacy(dp: bool, max_epsilon: float = 100.0) -> dict:
    """A site's ``privacy`` section; a benchmark site releases its means over
    any number of validation cases (its explicit choice)."""
    base = {"min_cases_for_aggregates": 1}
    if not dp:
        return base | {"enabled": False}
    return base | {"enabled": True, "max_epsilon": max_epsilon, "delta": DELTA}


def site_yaml(
    path: Path,
    name: str,
    work: Path,
    sizes: Sizes,
    *,
    split: str,
    dp: bool,
    state_dir: Path,
) -> Path:
    """Write the site YAML of hospital ``name`` at ``path``: it trains on the
    ``train`` cases and validates on ``split``'s."""
    if name not in HOSPITALS:
        raise ValueError(f"unknown hospital {name!r}; use {', '.join(HOSPITALS)}")
    doc = {
        "name": name,
        "data": {
            "root": str(data_root(work, name, sizes.per_site)),
            "layout": "kits23",
            "train_cases": sizes.cases("train"),
            "validation_cases": sizes.cases(split),
        },
        "device": "auto",
        "state_dir": str(state_dir),
        "privacy": privacy(dp),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def public_yaml(path: Path, work: Path, sizes: Sizes) -> Path:
    """Write the public set's YAML (no DP, a fifth of it for validation)."""
    doc = {
        "name": PUBLIC_NAME,
        "data": {
            "root": str(data_root(work, PUBLIC_NAME, sizes.public)),
            "layout": "kits23",
            "validation_fraction": 0.2,
        },
        "device": "auto",
        "state_dir": str(work / "state" / PUBLIC_NAME),
        "privacy": privacy(False),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
