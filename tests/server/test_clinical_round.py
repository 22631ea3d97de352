"""The coordinator's side of the clinical calibration (issue 28): the
candidates' federated table, the provenance, and what a hostile site can do."""

import pytest

from common.postprocess import CANDIDATES, choose
from server.clinical_round import candidate_table, training_data


def _site(n_tumour: int, n_free: int, none: dict, rule3: dict) -> dict:
    out = {"cases-tumour": float(n_tumour), "cases-no-tumour": float(n_free)}
    out["cases-kidney"] = float(n_tumour + n_free)
    out["num-val-cases"] = float(n_tumour + n_free)
    for index, values in ((0, none), (3, rule3)):
        out.update({f"pp{index}-{k}": v for k, v in values.items()})
    return out


BASE = {"dice-kidney": 0.9, "dice-tumour": 0.7, "lesion-sens-tumour": 0.9}


def test_each_candidate_is_averaged_over_its_own_denominator():
    a = _site(30, 10, BASE | {"fp-rate-tumour": 1.0}, BASE | {"fp-rate-tumour": 0.2})
    b = _site(10, 30, BASE | {"fp-rate-tumour": 0.6}, BASE | {"fp-rate-tumour": 0.0})
    table = candidate_table({"a": a, "b": b})
    assert set(table) == {CANDIDATES[0], CANDIDATES[3]}
    # FP rate over the tumour-free patients: (10 x 1.0 + 30 x 0.6) / 40
    assert table["none"]["fp-rate-tumour"] == pytest.approx(0.7)
    assert table[CANDIDATES[3]]["fp-rate-tumour"] == pytest.approx(0.05)


def test_a_site_claiming_huge_counts_moves_the_choice_no_more_than_its_cap():
    """A hostile site says rule 3 is perfect over a million patients; under
    max-site-weight 0.5 its share is half, and the honest site's bad figures
    for rule 3 keep it from winning."""
    honest = _site(
        40, 40, BASE | {"fp-rate-tumour": 0.5}, {**BASE, "dice-tumour": 0.3}
    ) | {"pp3-fp-rate-tumour": 0.5}
    liar = _site(10**6, 10**6, BASE | {"fp-rate-tumour": 0.5}, BASE) | {
        "pp3-fp-rate-tumour": 0.0,
        "pp3-dice-tumour": 1.0,
    }
    table = candidate_table({"honest": honest, "liar": liar}, cap=0.5)
    assert table[CANDIDATES[3]]["dice-tumour"] == pytest.approx(0.65)
    assert choose(table).rule == "none"  # tumour Dice 0.65 < 0.7: not eligible


@pytest.mark.parametrize(
    ("sites", "origin", "only"),
    [
        ({"a": 1, "b": 1}, None, True),
        ({"a": 1, "b": 1}, {"dataset": "kidneyfl public phantoms"}, True),
        ({"a": 1, "b": 1}, {"dataset": "KiTS23"}, False),  # real pretraining
        ({"a": 1, "b": 0}, None, False),
        ({"a": 1, "b": None}, None, False),  # unknown is not synthetic
        ({}, None, False),  # no site answered: nothing is known
    ],
)
def test_provenance(sites, origin, only):
    prov = training_data(sites, origin)
    assert prov["synthetic-only"] is only
    assert set(prov["sites"]) == set(sites)
