"""Post-processing rules on hand-built label maps, and the federation's choice."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.postprocess import (
    CANDIDATES,
    CHOICE_KEYS,
    apply_rule,
    apply_rules,
    candidate_key,
    choose,
    needs_probs,
    parse_rule,
    split_candidate_key,
)

SHAPE = (20, 20, 20)
SPACING = (4.0, 4.0, 5.0)  # 0.08 mL a voxel: 1 mL is 12.5 voxels


def _kidney() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:12, 2:12, 2:12] = 1
    return labels


def _probs(labels: np.ndarray) -> np.ndarray:
    """Confident one-hot-like softmax agreeing with ``labels``."""
    probs = np.full((4, *labels.shape), 0.02, dtype=np.float32)
    np.put_along_axis(probs, labels[None].astype(np.intp), 0.94, axis=0)
    return probs


def test_min_mass_turns_a_speck_into_kidney_or_background() -> None:
    labels = _kidney()
    labels[9, 9, 3:6] = 2  # 3-voxel tumour inside the kidney
    labels[16, 16, 15:18] = 2  # 3-voxel tumour floating
    labels[4, 4, 4] = 3  # 1-voxel cyst inside the kidney
    labels[3:6, 3:6, 8:11] = 2  # 27 voxels = 2.16 mL: kept
    out = apply_rule(labels, None, SPACING, "min-mass-ml-0.5")
    assert (out[9, 9, 3:6] == 1).all()
    assert (out[16, 16, 15:18] == 0).all()
    assert out[4, 4, 4] == 1
    assert (out[3:6, 3:6, 8:11] == 2).all()
    assert out.dtype == np.uint8


@pytest.mark.parametrize(("voxels", "kept"), [(25, True), (24, False)])
def test_min_mass_keeps_a_mass_of_exactly_the_limit(voxels: int, kept: bool) -> None:
    labels = _kidney()
    mass = np.zeros(25, dtype=np.uint8)
    mass[:voxels] = 2
    labels[4:9, 4:9, 6] = mass.reshape(5, 5)  # 25 voxels = 2.0 mL
    out = apply_rule(labels, None, SPACING, "min-mass-ml-2")
    assert np.count_nonzero(out == 2) == (voxels if kept else 0)


def test_tumour_touches_kidney() -> None:
    labels = _kidney()
    labels[15:18, 15:18, 15:18] = 2  # floating: removed
    labels[12, 12, 12] = 2  # touches the kidney at a corner: kept
    labels[0:2, 16:18, 0:2] = 3  # a floating cyst ...
    labels[2, 16:18, 0:2] = 2  # ... with a tumour on it: kept
    out = apply_rule(labels, None, SPACING, "tumour-touches-kidney")
    assert (out[15:18, 15:18, 15:18] == 0).all()
    assert out[12, 12, 12] == 2
    assert (out[2, 16:18, 0:2] == 2).all()
    assert np.array_equal(out == 3, labels == 3)


def test_kidney_largest_2_removes_a_third_component() -> None:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:8, 1:8, 1:8] = 1
    labels[1:8, 12:19, 1:8] = 1
    labels[4, 4, 4] = 2
    labels[14:17, 14:17, 14:17] = 1  # third and smallest, with its own tumour
    labels[15, 15, 15] = 2
    out = apply_rule(labels, None, SPACING, "kidney-largest-2")
    assert (out[14:17, 14:17, 14:17] == 0).all()
    assert np.array_equal(out[:, :, :8], labels[:, :, :8])


def test_tumour_prob_gives_low_voxels_the_next_most_probable_class() -> None:
    labels = _kidney()
    labels[5, 5, 5:8] = 2
    probs = _probs(labels)
    probs[:, 5, 5, 5] = (0.1, 0.2, 0.3, 0.4)  # -> cyst
    probs[:, 5, 5, 6] = (0.5, 0.3, 0.2, 0.0)  # -> background
    probs[:, 5, 5, 7] = (0.0, 0.2, 0.75, 0.05)  # confident: stays tumour
    out = apply_rule(labels, probs, SPACING, "tumour-prob-0.7")
    assert out[5, 5, 5:8].tolist() == [3, 0, 2]
    with pytest.raises(ValueError, match="tumour-prob-0.7"):
        apply_rule(labels, None, SPACING, "tumour-prob-0.7")


def test_order_of_parts_matters() -> None:
    labels = _kidney()
    labels[4:7, 4:7, 4:7] = 2  # 27 voxels, 2.16 mL
    probs = _probs(labels)
    probs[:, 4:7, 4:7, 4:7] = np.array([0.05, 0.5, 0.4, 0.05])[:, None, None, None]
    probs[:, 5, 5, 4:7] = np.array([0.0, 0.05, 0.9, 0.05])[:, None]  # 3 sure voxels
    # unsure voxels go to kidney, and the 3 left are then too small
    first_prob = apply_rule(labels, probs, SPACING, "tumour-prob-0.7+min-mass-ml-1")
    assert np.count_nonzero(first_prob == 2) == 0
    # the whole tumour passes the size rule first, then loses its unsure voxels
    first_mass = apply_rule(labels, probs, SPACING, "min-mass-ml-1+tumour-prob-0.7")
    assert np.count_nonzero(first_mass == 2) == 3


@pytest.mark.parametrize("rule", CANDIDATES)
def test_every_candidate_leaves_its_input_alone(rule: str) -> None:
    labels = _kidney()
    labels[4:7, 4:7, 4:7] = 2
    labels[16, 16, 16] = 3
    probs = _probs(labels)
    before, probs_before = labels.copy(), probs.copy()
    out = apply_rule(labels, probs, SPACING, rule)
    assert np.array_equal(labels, before) and np.array_equal(probs, probs_before)
    assert out.dtype == np.uint8 and not np.shares_memory(out, labels)


def test_candidates_parse_and_keep_their_wire_indexes() -> None:
    # an index is a wire name: entries may be appended, never moved
    assert CANDIDATES[:6] == (
        "none",
        "tumour-touches-kidney",
        "min-mass-ml-0.5",
        "min-mass-ml-1",
        "min-mass-ml-2",
        "kidney-largest-2",
    )
    assert len(set(CANDIDATES)) == len(CANDIDATES)
    for rule in CANDIDATES:
        assert parse_rule(rule)
    assert needs_probs("kidney-largest-2+tumour-prob-0.7")
    assert not needs_probs("min-mass-ml-1")


@pytest.mark.parametrize(
    ("rule", "bad"),
    [
        ("min-mass-ml-x", "min-mass-ml-x"),
        ("tumour-touches-kidney+kidney-largest-3", "kidney-largest-3"),
        ("tumour-prob-1.5", "tumour-prob-1.5"),
        ("min-mass-ml-0", "min-mass-ml-0"),
        ("min-mass-ml-1+", "''"),
        ("none+min-mass-ml-1", "none"),
    ],
)
def test_parse_errors_name_the_bad_part(rule: str, bad: str) -> None:
    with pytest.raises(ValueError, match="min-mass-ml-V") as err:
        parse_rule(rule)
    assert bad in str(err.value)


def test_bad_inputs_are_refused() -> None:
    labels = _kidney()
    with pytest.raises(ValueError, match="0..3"):
        apply_rule(labels + 3, None, SPACING, "none")
    with pytest.raises(ValueError, match="spacing"):
        apply_rule(labels, None, (4.0, 4.0), "none")
    with pytest.raises(ValueError, match="probs"):
        apply_rule(labels, np.zeros((3, *SHAPE)), SPACING, "none")


def test_candidate_keys_round_trip() -> None:
    for index in range(len(CANDIDATES)):
        key = candidate_key(index, "dice-tumour")
        assert split_candidate_key(key) == (index, "dice-tumour")
    assert candidate_key(3, "fp-rate-tumour") == "pp3-fp-rate-tumour"
    for other in ("dice-tumour", f"pp{len(CANDIDATES)}-dice", "pp01-dice", "pp3-"):
        assert split_candidate_key(other) is None
    with pytest.raises(ValueError):
        candidate_key(len(CANDIDATES), "dice-tumour")


def _row(
    kidney: float = 0.95,
    tumour: float = 0.67,
    fp_rate: float = 0.96,
    sens: float = 0.91,
    fp_lesions: float = 3.0,
) -> dict[str, float]:
    values = (kidney, tumour, fp_rate, sens, fp_lesions)
    return dict(zip(CHOICE_KEYS, values, strict=True))


FULL = "kidney-largest-2+tumour-touches-kidney+min-mass-ml-1"


def test_choose_picks_the_best_eligible_rule() -> None:
    table = {
        "none": _row(),  # score (0.67 + 0.91 + 0.04) / 3 = 0.54
        "min-mass-ml-1": _row(fp_rate=0.5, sens=0.90),  # 0.69
        FULL: _row(tumour=0.68, fp_rate=0.12, sens=0.88, fp_lesions=0.4),  # 0.813
        "tumour-prob-0.7": _row(fp_rate=0.0, sens=0.80),  # 0.823, loses lesions
        "kidney-largest-2": _row(kidney=0.94, fp_rate=0.0),  # 0.86, loses kidney
    }
    choice = choose(table)
    assert choice.rule == FULL
    assert choice.score == pytest.approx((0.68 + 0.88 + 0.88) / 3)
    assert choice.reason.startswith(FULL + ":")
    assert "0.960 -> 0.120" in choice.reason and "0.540 -> 0.813" in choice.reason
    assert choice.table["kidney-largest-2"]["eligible"] == 0.0
    assert choice.table[FULL]["eligible"] == 1.0


def test_choose_refuses_a_kidney_dice_drop_of_001_but_not_0005() -> None:
    better = {"fp_rate": 0.0}
    assert (
        choose({"none": _row(), "kidney-largest-2": _row(kidney=0.94, **better)}).rule
        == "none"
    )
    assert (
        choose({"none": _row(), "kidney-largest-2": _row(kidney=0.945, **better)}).rule
        == "kidney-largest-2"
    )


def test_choose_keeps_none_for_a_tiny_gain_or_no_eligible_rule() -> None:
    tiny = choose({"none": _row(), "min-mass-ml-1": _row(fp_rate=0.948)})  # +0.004
    assert tiny.rule == "none" and tiny.reason.startswith("none kept")
    assert tiny.score == pytest.approx(0.54)
    nothing = choose({"none": _row(), "min-mass-ml-1": _row(tumour=0.6, fp_rate=0)})
    assert nothing.rule == "none" and "no candidate rule" in nothing.reason
    assert choose({"none": _row()}).rule == "none"


def test_choose_breaks_ties_by_fewer_parts() -> None:
    same = _row(fp_rate=0.1)
    table = {"none": _row(), "tumour-touches-kidney+min-mass-ml-1": same}
    table["min-mass-ml-1"] = same
    assert choose(table).rule == "min-mass-ml-1"


def test_choose_with_missing_metrics() -> None:
    incomplete = {
        k: v for k, v in _row(fp_rate=0.0).items() if k != "fp-lesions-tumour"
    }
    assert choose({"none": _row(), "min-mass-ml-1": incomplete}).rule == "none"
    base = {k: v for k, v in _row().items() if k != "dice-kidney"}
    choice = choose({"none": base, "kidney-largest-2": _row(kidney=0.5, fp_rate=0.0)})
    assert choice.rule == "kidney-largest-2" and "dice-kidney" in choice.reason
    with pytest.raises(ValueError, match="none"):
        choose({"min-mass-ml-1": _row()})


@settings(max_examples=40, deadline=None)
@given(
    labels=hnp.arrays(np.uint8, (6, 7, 5), elements=st.integers(0, 3)),
    seed=st.integers(0, 2**32 - 1),
    spacing=st.sampled_from([SPACING, (1.0, 1.0, 1.0), (8.0, 8.0, 10.0)]),
)
def test_candidates_never_add_tumour(
    labels: np.ndarray, seed: int, spacing: tuple[float, float, float]
) -> None:
    probs = np.random.default_rng(seed).dirichlet(np.ones(4), size=labels.shape)
    probs = np.moveaxis(probs, -1, 0)
    before = labels.copy()
    for rule in CANDIDATES:
        out = apply_rule(labels, probs, spacing, rule)
        assert out.shape == labels.shape
        assert set(np.unique(out)) <= {0, 1, 2, 3}
        assert not ((out == 2) & (labels != 2)).any()
        assert np.array_equal(out, apply_rule(labels, probs, spacing, rule))
    assert np.array_equal(labels, before)


_PARTS = st.sampled_from(
    [
        "tumour-touches-kidney",
        "kidney-largest-2",
        "min-mass-ml-0.5",
        "min-mass-ml-1",
        "min-mass-ml-2",
        "tumour-prob-0.7",
    ]
)
_RULES = st.one_of(
    st.just("none"), st.lists(_PARTS, min_size=1, max_size=4).map("+".join)
)


@settings(max_examples=60, deadline=None)
@given(
    labels=hnp.arrays(np.uint8, (6, 7, 5), elements=st.integers(0, 3)),
    seed=st.integers(0, 2**32 - 1),
    rules=st.one_of(st.just(list(CANDIDATES)), st.lists(_RULES, max_size=8)),
)
def test_shared_prefixes_give_what_each_rule_gives_alone(
    labels: np.ndarray, seed: int, rules: list[str]
) -> None:
    """The clinical calibration evaluates every candidate through
    apply_rules, which computes each shared prefix of parts once (and each
    min-mass prefix's components once for all limits): a candidate's map must
    be exactly the one apply_rule gives it, or the federation would choose its
    post-processing on metrics of maps no one will ever predict."""
    probs = np.random.default_rng(seed).dirichlet(np.ones(4), size=labels.shape)
    probs = np.moveaxis(probs, -1, 0)
    before = labels.copy()
    maps = apply_rules(labels, probs, SPACING, rules)
    assert len(maps) == len(rules)
    for rule, got in zip(rules, maps, strict=True):
        assert np.array_equal(got, apply_rule(labels, probs, SPACING, rule)), rule
        assert got.dtype == np.uint8
    assert np.array_equal(labels, before)


def test_apply_rules_refuses_what_apply_rule_refuses():
    with pytest.raises(ValueError, match="bogus"):
        apply_rules(_kidney(), None, SPACING, ["none", "bogus"])
    with pytest.raises(ValueError, match="needs the softmax"):
        apply_rules(_kidney(), None, SPACING, ["tumour-prob-0.7"])


def test_without_probability_keeps_the_label_only_parts():
    from common.postprocess import without_probability

    assert without_probability("none") == "none"
    assert without_probability("tumour-prob-0.7") == "none"
    rule = "kidney-largest-2+tumour-touches-kidney+min-mass-ml-1+tumour-prob-0.7"
    assert without_probability(rule) == (
        "kidney-largest-2+tumour-touches-kidney+min-mass-ml-1"
    )
    for candidate in CANDIDATES:
        parse_rule(without_probability(candidate))  # always a valid rule
