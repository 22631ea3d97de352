"""Tests for the synthetic KiTS-layout CT phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sim.phantoms.ct import generate_case
from sim.phantoms.kits_writer import case_seed, write_site
from sim.phantoms.profiles import (
    DEFAULT_SCALE,
    IMAGE_NAME,
    METADATA_NAME,
    PROFILES,
    SEGMENTATION_NAME,
    SiteProfile,
    load_profile,
    voxel_spacing,
)
from tests.fakes import write_site_yaml


def _variant(name: str, **changes: object) -> SiteProfile:
    return SiteProfile(**{**PROFILES[name].model_dump(), **changes})


def _world(case, ijk: np.ndarray) -> np.ndarray:
    return case.affine[:3, :3] @ ijk + case.affine[:3, 3]


@pytest.mark.parametrize("name", ["thin-slice-cm", "standard-nephro"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kidney_anatomy(name: str, seed: int) -> None:
    # No lesions, so label >= 1 is exactly the two kidneys.
    case = generate_case(
        _variant(name, tumour_prevalence=0.0, cyst_prevalence=0.0), seed
    )
    assert case.label.dtype == np.uint8 and case.image.dtype == np.float32
    assert case.image.shape == case.label.shape
    assert set(np.unique(case.label)) == {0, 1}
    components, n = ndimage.label(case.label >= 1)
    assert n == 2
    kidneys = []
    for i in (1, 2):
        idx = np.argwhere(components == i)
        length_mm = (np.ptp(idx[:, 2]) + 1) * case.spacing[2]
        assert 95.0 <= length_mm <= 130.0
        kidneys.append(_world(case, idx.mean(axis=0)))
    right, left = sorted(kidneys, key=lambda c: c[0])
    assert right[0] < -30.0 and left[0] > 30.0  # RAS: patient right has smaller x
    assert 10.0 <= left[2] - right[2] <= 25.0  # right kidney lies lower
    assert right[1] < 0 and left[1] < 0  # posterior, beside the spine


def test_labels_are_kits_values() -> None:
    profile = _variant("thin-slice-cm", tumour_prevalence=1.0, cyst_prevalence=1.0)
    seen: set[int] = set()
    for seed in range(3):
        seen |= set(np.unique(generate_case(profile, seed).label).tolist())
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("prevalence", [0.0, 1.0])
def test_tumour_prevalence(prevalence: float) -> None:
    # The coarsest profile also checks that small tumours survive voxelisation.
    profile = _variant("thick-slice-noisy", tumour_prevalence=prevalence)
    has_tumour = [(generate_case(profile, s).label == 2).any() for s in range(6)]
    assert has_tumour == [bool(prevalence)] * 6


def test_cyst_intensity() -> None:
    profile = _variant("standard-nephro", tumour_prevalence=0.5, cyst_prevalence=1.0)
    checked = 0
    for seed in range(4):
        case = generate_case(profile, seed)
        cyst = case.image[case.label == 3]
        if cyst.size < 5:
            continue
        tolerance = 4 * profile.noise_hu / np.sqrt(cyst.size)
        mean = cyst.mean() - profile.intensity_offset_hu
        assert -tolerance <= mean <= 20.0 + tolerance
        checked += 1
    assert checked >= 3


def test_written_files(tmp_path: Path) -> None:
    profile = PROFILES["standard-nephro"]
    (case_dir,) = write_site(tmp_path / "site", profile, n_cases=1, seed=5)
    expected = np.array(voxel_spacing(profile, DEFAULT_SCALE))
    assert np.allclose(
        expected,
        [profile.inplane_spacing_mm * DEFAULT_SCALE] * 2
        + [profile.slice_thickness_mm * DEFAULT_SCALE],
    )
    image = nib.load(case_dir / IMAGE_NAME)
    seg = nib.load(case_dir / SEGMENTATION_NAME)
    for img in (image, seg):
        assert np.allclose(img.header.get_zooms(), expected)
        assert np.allclose(np.diag(img.affine)[:3], expected)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert image.get_data_dtype() == np.float32
    assert seg.get_data_dtype() == np.uint8
    case = generate_case(profile, case_seed(5, 0))
    assert np.array_equal(np.asanyarray(image.dataobj), case.image)
    assert np.array_equal(np.asanyarray(seg.dataobj), case.label)
    assert np.allclose(image.affine, case.affine)
    meta = json.loads((tmp_path / "site" / METADATA_NAME).read_text())
    assert meta["profile"] == profile.model_dump() and meta["n_cases"] == 1


def test_determinism_and_site_differences() -> None:
    thin, nephro = PROFILES["thin-slice-cm"], PROFILES["standard-nephro"]
    a, b = generate_case(nephro, 3), generate_case(nephro, 3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    c = generate_case(nephro, 4)
    assert not np.array_equal(a.label, c.label)
    assert not np.array_equal(a.image, c.image)
    d = generate_case(thin, 3)
    assert d.spacing != a.spacing
    # Corticomedullary kidneys are bright cortex around dark medulla; nephrographic
    # kidneys are homogeneous, so the spread of kidney HU separates the phases.
    cm_std = d.image[d.label == 1].std()
    nephro_std = a.image[a.label == 1].std()
    assert cm_std > 2 * nephro_std


def test_write_site_idempotent(tmp_path: Path) -> None:
    profile = PROFILES["thick-slice-noisy"]
    out = tmp_path / "site"
    dirs = write_site(out, profile, n_cases=2, seed=1)
    assert [d.name for d in dirs] == ["case_00000", "case_00001"]
    files = [d / n for d in dirs for n in (IMAGE_NAME, SEGMENTATION_NAME)]
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert write_site(out, profile, n_cases=2, seed=1) == dirs
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    # An interrupted run is resumed: only the missing file's case is rewritten.
    files[3].unlink()
    write_site(out, profile, n_cases=2, seed=1)
    assert files[3].exists() and files[0].stat().st_mtime_ns == mtimes[0]


def test_write_site_mismatch(tmp_path: Path) -> None:
    profile = PROFILES["thick-slice-noisy"]
    out = tmp_path / "site"
    write_site(out, profile, n_cases=2, seed=1)
    before = np.asanyarray(nib.load(out / "case_00000" / IMAGE_NAME).dataobj)
    with pytest.raises(FileExistsError, match="overwrite") as err:
        write_site(out, profile, n_cases=2, seed=2)
    assert str(out) in str(err.value)
    dirs = write_site(out, profile, n_cases=1, seed=2, overwrite=True)
    after = np.asanyarray(nib.load(dirs[0] / IMAGE_NAME).dataobj)
    assert not np.array_equal(before, after)
    assert not (out / "case_00001").exists()  # stale case from the old run removed
    assert json.loads((out / METADATA_NAME).read_text())["seed"] == 2


def test_load_profile(tmp_path: Path) -> None:
    assert load_profile("standard-nephro") is PROFILES["standard-nephro"]
    with pytest.raises(ValueError) as err:
        load_profile("no-such-site")
    assert all(name in str(err.value) for name in PROFILES)

    fields = {**PROFILES["thin-slice-cm"].model_dump(), "name": "custom"}
    good = tmp_path / "custom.json"
    good.write_text(json.dumps(fields))
    assert load_profile(str(good)) == SiteProfile(**fields)

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "slice_thickness_mm: 9\ninplane_spacing_mm: 0.8\nnoise_hu: 10\n"
        "phase: nephrographic\n"
    )
    with pytest.raises(ValueError, match="slice_thickness_mm"):
        load_profile(str(bad))

    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "inplane_spacing_mm: 0.8\nslice_thickness_mm: 2\nnoise_hu: 10\n"
        "phase: nephrographic\nkvp: 120\n"
    )
    with pytest.raises(ValueError, match="kvp"):
        load_profile(str(extra))


def test_write_site_never_deletes_foreign_cases(tmp_path: Path) -> None:
    foreign = tmp_path / "kits" / "case_00000"
    foreign.mkdir(parents=True)
    (foreign / IMAGE_NAME).write_bytes(b"real data")
    with pytest.raises(FileExistsError, match="not written by the phantom"):
        write_site(
            tmp_path / "kits", PROFILES["thick-slice-noisy"], n_cases=1, overwrite=True
        )
    assert (foreign / IMAGE_NAME).read_bytes() == b"real data"


def test_demo_sites_are_the_utility_benchmark_s_hospitals_and_public_set() -> None:
    """docs/utility.md's measurements predict the demo only while the demo's
    phantoms are the benchmark's: same scanners, case mixes and tumour sizes,
    and the public stand-in is a fourth scanner, trained without DP."""
    from common.config import load_site_config
    from sim.phantoms import benchmark as bench
    from sim.phantoms.sites import site_profile

    root = Path(__file__).resolve().parents[2] / "sites"
    hospitals = [load_site_config(p) for p in sorted(root.glob("hospital-*.yaml"))]
    public = load_site_config(root / "public-phantoms.yaml")
    assert not public.privacy.enabled and all(h.privacy.enabled for h in hospitals)
    demo = [site_profile(s) for s in [*hospitals, public]]
    ours = [p for p, _ in bench.HOSPITALS.values()] + [bench.PUBLIC[0]]
    for got, want in zip(demo, ours, strict=True):
        assert got.model_dump(exclude={"name"}) == want.model_dump(exclude={"name"})
    scanners = {(p.slice_thickness_mm, p.noise_hu, p.intensity_offset_hu) for p in demo}
    assert len(scanners) == 4
    assert public.phantom.seed not in {h.phantom.seed for h in hospitals}


def _site_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sites_written_side_by_side_equal_those_written_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulation writes several sites' phantoms in a process pool: the
    bytes must be those of writing them one after another (same seeds, same
    subgroups), or a benchmark's numbers would depend on the machine's cores."""
    from common.config import load_site_config
    from sim import runner

    def sites(where: Path) -> list:
        where.mkdir()
        return [
            load_site_config(
                write_site_yaml(where, name, cases=3, seed=seed, generate=False)
            )
            for name, seed in (("a", 1), ("b", 2))
        ]

    used: list[int] = []
    real_pool = runner.concurrent.futures.ProcessPoolExecutor

    def pool(workers: int) -> object:
        used.append(workers)
        return real_pool(workers)

    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runner.concurrent.futures, "ProcessPoolExecutor", pool)
    monkeypatch.setattr(runner.threading, "active_count", lambda: 1)
    runner.prepare_phantoms(sites(tmp_path / "pool"))
    assert used == [2]
    monkeypatch.setattr(runner.threading, "active_count", lambda: 2)  # a thread
    runner.prepare_phantoms(sites(tmp_path / "serial"))
    assert used == [2]  # beside another thread: no fork
    for name in ("a", "b"):
        pooled = _site_files(tmp_path / "pool" / "data" / name)
        assert pooled and pooled == _site_files(tmp_path / "serial" / "data" / name)


def test_a_writer_error_in_the_pool_reaches_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.config import load_site_config
    from sim import runner

    good = load_site_config(write_site_yaml(tmp_path, "a", cases=2, generate=False))
    bad = load_site_config(write_site_yaml(tmp_path, "b", cases=2, generate=False))
    bad = bad.model_copy(
        update={"phantom": bad.phantom.model_copy(update={"profile": "no-such"})}
    )
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runner.threading, "active_count", lambda: 1)
    with pytest.raises(ValueError, match="no-such"):
        runner.prepare_phantoms([good, bad])
