"""The mixed CT + MR benchmark's building blocks (benchmarks/mixed_modality.py):
its site YAMLs validate and their phantoms are the modality they declare,
every federation's plan accepts its sites, and the table's numbers (spread
over seeds, per-modality means, ratios) agree with hand-computed ones
(docs/mixed-modality.md is written from them)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.request_refused import RequestRefused
from client.scan_check import intensity_kind
from client.tasks.segmentation.pipeline import require_modality
from common.config import load_plan, load_site_config
from sim.phantoms.sites import site_profile
from sim.runner import default_plan

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def mm():
    sys.path.insert(0, str(BENCH))  # run as a file, as the docs say
    try:
        yield importlib.import_module("mixed_modality")
    finally:
        sys.path.remove(str(BENCH))


def test_sites_validate_and_are_the_modality_they_declare(mm, tmp_path) -> None:
    sizes = mm.Sizes(cases=2, validation_fraction=0.5, scale=8.0)
    paths = mm.write_sites(tmp_path, sizes, threads=1)
    assert list(paths) == list(mm.SITES)
    for name, path in paths.items():
        site = load_site_config(path)
        spec = mm.SITES[name]
        assert site.data.modality == spec.modality and site.cpu_threads == 1
        assert not site.privacy.enabled
        assert site_profile(site).modality == spec.modality  # overrides applied
        image = site.data.root / "case_00000" / "imaging.nii.gz"
        data = np.asarray(nib.load(image).dataobj, dtype=np.float32)
        assert intensity_kind(data[np.isfinite(data)]) == spec.modality
    # the two MR sites are not the same scanner
    a, b = (site_profile(load_site_config(paths[n])) for n in ("mr-a", "mr-b"))
    assert (a.slice_thickness_mm, a.noise_hu) != (b.slice_thickness_mm, b.noise_hu)


@pytest.mark.parametrize("quick", [True, False])
def test_every_federation_plan_accepts_its_sites(mm, tmp_path, quick) -> None:
    paths = {
        n: mm.site_yaml(tmp_path, n, s, mm.QUICK, threads=1)
        for n, s in mm.SITES.items()
    }
    base = mm.QUICK_PLAN if quick else mm.PLAN
    for row, fed in mm.FEDERATIONS.items():
        plan = load_plan(
            {**default_plan(), **base, **fed.plan, "min-sites": len(fed.sites)}, row
        )
        for name in mm.SITES:
            site = load_site_config(paths[name])
            if name in fed.sites:
                assert require_modality(site, plan) == site.data.modality
            else:  # a single-modality plan refuses the other modality's sites
                with pytest.raises(RequestRefused) as refused:
                    require_modality(site, plan)
                assert refused.value.code == "request-invalid"
    # the evaluation's plan takes every site, with its own modality
    mixed = load_plan({**default_plan(), **base, "modality": "mixed"}, "eval")
    assert {require_modality(load_site_config(p), mixed) for p in paths.values()} == {
        "CT",
        "MR",
    }


def test_spread_on_hand_made_numbers(mm) -> None:
    s = mm.spread([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["sd"] == pytest.approx(0.2)
    assert (s["min"], s["max"], s["n"]) == (0.5, 0.9, 3)
    one = mm.spread([0.4, float("nan")])  # a region no case had is left out
    assert (one["mean"], one["sd"], one["n"]) == (0.4, 0.0, 1)
    assert math.isnan(mm.spread([])["mean"])


def _sites(ct: tuple[float, float], mr: tuple[float, float]) -> dict:
    """Per-site metrics: both CT sites get ``ct`` (kidney, tumour) +- 0.1,
    both MR sites ``mr`` +- 0.1 (so the modality's mean is the given value)."""
    out = {}
    for name, spec in {"ct-a": 1, "ct-b": -1, "mr-a": 1, "mr-b": -1}.items():
        k, t = ct if name.startswith("ct") else mr
        out[name] = {"dice-kidney": k + 0.1 * spec, "dice-tumour": t + 0.1 * spec}
    return out


def test_summary_per_modality_with_ratios(mm) -> None:
    runs = {
        "CT only": {"0": {"sites": _sites((0.8, 0.4), (0.2, 0.0))},
                    "1": {"sites": _sites((0.6, 0.2), (0.2, 0.0))}},
        "MR only": {"0": {"sites": _sites((0.1, 0.0), (0.5, 0.3))},
                    "1": {"sites": _sites((0.1, 0.0), (0.7, 0.3))}},
        "mixed FedAvg": {"0": {"sites": _sites((0.56, 0.45), (0.9, 0.15))},
                         "1": {"sites": _sites((0.56, 0.45), (0.6, 0.15))}},
    }  # fmt: skip
    s = mm.summarise(runs)
    ct = s["CT only"]["CT kidney"]
    assert ct["mean"] == pytest.approx(0.7)
    assert ct["sd"] == pytest.approx(math.sqrt(0.02))  # 0.8 and 0.6
    assert (ct["min"], ct["max"]) == pytest.approx((0.6, 0.8))
    assert math.isnan(ct["ratio"])  # a reference row has no ratio
    mixed = s["mixed FedAvg"]
    # each mixed cell against the single-modality federation of its modality
    assert mixed["CT kidney"]["ratio"] == pytest.approx(0.56 / 0.7)
    assert mixed["CT tumour"]["ratio"] == pytest.approx(0.45 / 0.3)
    assert mixed["MR kidney"]["mean"] == pytest.approx(0.75)
    assert mixed["MR kidney"]["ratio"] == pytest.approx(0.75 / 0.6)
    assert mixed["MR tumour"]["ratio"] == pytest.approx(0.15 / 0.3)
    table = mm.render(s, seeds=2)
    line = next(x for x in table.splitlines() if x.startswith("| CT only"))
    assert "0.700 ± 0.141 (0.60-0.80)" in line
    assert "[0.200 ± 0.000 (0.20-0.20)]" in line  # never trained on MR
    line = next(x for x in table.splitlines() if x.startswith("| mixed FedAvg"))
    assert "0.560 ± 0.000 (0.56-0.56) x0.80" in line and "x1.25" in line


def test_report_from_results_json(mm, tmp_path) -> None:
    out = {
        "config": {"seeds": [0]},
        "runs": {"CT only": {"0": {"sites": _sites((0.8, 0.4), (0.2, 0.0))}},
                 "MR only": {}},
        "wall_s": 120.0,
    }  # fmt: skip
    path = tmp_path / "r.json"
    path.write_text(json.dumps(out))
    assert mm.main(["--from-results", str(path)]) == 0
    text = mm.report(out)
    assert "| CT only | 0.800 ± 0.000" in text and "MR only" not in text
    assert "0.90 / 0.50 | 0.70 / 0.30" in text and "2.0 min" in text


def test_fedbn_exported_model_is_its_own_row(mm) -> None:
    ref = {"0": {"sites": _sites((0.8, 0.4), (0.6, 0.2))}}
    runs = {
        "CT only": ref,
        "MR only": ref,
        "mixed FedBN": {
            "0": {
                "sites": _sites((0.8, 0.4), (0.6, 0.2)),
                mm.EXPORTED: _sites((0.2, 0.1), (0.3, 0.0)),
            }
        },
    }
    rows = mm.rows_of(runs)
    assert list(rows)[-1] == "mixed FedBN (exported norm)"
    s = mm.summarise(rows)
    assert s["mixed FedBN"]["CT kidney"]["ratio"] == pytest.approx(1.0)
    exported = s["mixed FedBN (exported norm)"]
    assert exported["CT kidney"]["ratio"] == pytest.approx(0.2 / 0.8)
    assert exported["MR kidney"]["ratio"] == pytest.approx(0.3 / 0.6)
    assert "[" not in mm.render(s, seeds=1).splitlines()[-3]  # trained on both
