"""The utility benchmark's phantoms: tumour size fields and the fixed splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import load_site_config
from sim.phantoms import benchmark as bench
from sim.phantoms.ct import generate_case
from sim.phantoms.profiles import PROFILES, SiteProfile

ORIGINAL_FIELDS = {
    "name",
    "slice_thickness_mm",
    "inplane_spacing_mm",
    "noise_hu",
    "phase",
    "intensity_offset_hu",
    "tumour_prevalence",
    "cyst_prevalence",
}


def test_builtin_profiles_dump_as_before() -> None:
    # phantom.json records the dump; new keys would make every existing demo
    # site folder read as made "with different settings"
    for profile in PROFILES.values():
        assert set(profile.model_dump()) == ORIGINAL_FIELDS
    big = bench.HOSPITALS["hospital-thin"][0].model_dump()
    assert big["tumour_median_diameter_mm"] == 55.0


def test_explicit_default_size_is_the_same_phantom() -> None:
    base = PROFILES["standard-nephro"]
    same = SiteProfile(
        **base.model_dump(), tumour_median_diameter_mm=40.0, tumour_min_diameter_mm=15.0
    )
    a, b = generate_case(base, 3, scale=6.0), generate_case(same, 3, scale=6.0)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)


def test_larger_tumour_setting_gives_larger_tumours() -> None:
    base = SiteProfile(
        **{**PROFILES["standard-nephro"].model_dump(), "cyst_prevalence": 0}
    )
    big = base.model_copy(
        update={"tumour_median_diameter_mm": 60.0, "tumour_min_diameter_mm": 35.0}
    )
    small = sum(int((generate_case(base, s, 6.0).label == 2).sum()) for s in range(4))
    large = sum(int((generate_case(big, s, 6.0).label == 2).sum()) for s in range(4))
    assert large > 1.5 * small


def test_min_above_median_is_refused() -> None:
    with pytest.raises(ValueError, match="tumour_min_diameter_mm"):
        SiteProfile(
            **PROFILES["thin-slice-cm"].model_dump(),
            tumour_median_diameter_mm=30.0,
            tumour_min_diameter_mm=40.0,
        )


def test_benchmark_splits_are_disjoint_and_large_enough(tmp_path: Path) -> None:
    sizes = bench.FULL
    assert sizes.train >= 100
    train, val, tune = (set(sizes.cases(s)) for s in ("train", *bench.SPLITS))
    assert not (train & val or train & tune or val & tune)
    assert len(train | val | tune) == sizes.per_site
    profiles = [p for p, _ in bench.HOSPITALS.values()]
    assert len({(p.slice_thickness_mm, p.phase) for p in profiles}) == 3  # non-IID
    assert all(p.tumour_prevalence > 0.5 for p in profiles)
    assert bench.PUBLIC[0].name not in {p.name for p in profiles}
    for split in bench.SPLITS:
        path = bench.site_yaml(
            tmp_path / f"{split}.yaml",
            "hospital-thick",
            tmp_path,
            sizes,
            split=split,
            dp=True,
            state_dir=tmp_path / "state",
        )
        site = load_site_config(path)
        assert site.data.train_cases == sizes.cases("train")
        assert site.data.validation_cases == sizes.cases(split)
        assert site.privacy.enabled
