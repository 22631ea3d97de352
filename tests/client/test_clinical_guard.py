"""What a hostile coordinator can ask of the clinical calibration (issue 28):
a reference sharper than the floor is refused, and each stage is answered
once per run."""

from types import SimpleNamespace

import pytest

from client.clinical_round import answer_once
from client.request_guard import check_request
from client.request_refused import RequestRefused
from common import wire
from common.config import Plan
from common.ood import STD_FLOOR


def _cfg(**extra) -> dict:
    return {wire.RUN_ID: "run.abcd1234", wire.CLINICAL_STAGE: 2, **extra}


def test_a_reference_sharper_than_the_floor_is_refused(tiny_site):
    mean = [0.0] * wire.OOD_N_FEATURES
    ok = check_request(
        "evaluate",
        _cfg(**{wire.OOD_MEAN: mean, wire.OOD_STD: list(STD_FLOOR)}),
        Plan(),
        tiny_site,
    )
    assert ok.clinical_stage == 2 and ok.ood_std == tuple(STD_FLOOR)
    for i in range(wire.OOD_N_FEATURES):  # one feature made sharp: a probe
        std = list(STD_FLOOR)
        std[i] = STD_FLOOR[i] / 10
        with pytest.raises(RequestRefused, match="ood-std"):
            check_request(
                "evaluate",
                _cfg(**{wire.OOD_MEAN: mean, wire.OOD_STD: std}),
                Plan(),
                tiny_site,
            )
    for bad in ([1.0] * 3, ["x"] * wire.OOD_N_FEATURES, [float("nan")] * 11):
        with pytest.raises(RequestRefused):
            check_request(
                "evaluate",
                _cfg(**{wire.OOD_MEAN: mean, wire.OOD_STD: bad}),
                Plan(),
                tiny_site,
            )
    with pytest.raises(RequestRefused):  # an unknown stage
        check_request("evaluate", _cfg(**{wire.CLINICAL_STAGE: 3}), Plan(), tiny_site)


def test_each_stage_is_answered_once_per_run(tiny_site):
    def request(run: str, stage: int) -> SimpleNamespace:
        return SimpleNamespace(
            site=tiny_site, run_id=run, checked=SimpleNamespace(clinical_stage=stage)
        )

    answer_once(request("run-a", 1))
    answer_once(request("run-a", 2))
    answer_once(request("run-b", 2))  # another run: its own stages
    for stage in (1, 2):
        with pytest.raises(RequestRefused, match="already"):
            answer_once(request("run-a", stage))
