"""The holes a hostile coordinator found in the site's request path (issue 27),
one test each: the ledger only grows, a run's noise is bound to its schedule and
never below the site's floor, a request's numbers are checked before anything
is calibrated or spent, the steps recorded are the steps run, releases are
counted per run, and run ids never name files."""

import hashlib
import json

import pytest
import torch
from flwr.app import ArrayRecord

from client import app as site_app
from client import train as train_mod
from client.local_state import personal_dir
from client.privacy.accounting import epsilon_for, merged, poisson_schedule
from client.privacy.dpsgd import DPSpec
from client.privacy.ledger import (
    LEDGER_NAME,
    InvalidEntry,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    RunSchedule,
    SiteLimits,
)
from client.request_guard import QueryCounter, check_request, run_key
from client.request_refused import RequestRefused
from common import wire
from common.config import load_plan, load_site_config
from common.models import build_model
from tests.fakes import (
    DEFAULT_PRIVACY,
    TINY_PLAN,
    site_context,
    site_message,
    write_site_yaml,
)

SCHEDULE = RunSchedule(
    target_epsilon=8.0,
    delta=1e-3,
    batch_size=48,
    total_rounds=5,
    local_epochs=2,
    fine_tune_steps=0,
)
LIMITS = SiteLimits(max_epsilon=10.0, run_epsilon=10.0, min_noise=0.3)


def _spend(ledger, schedule=SCHEDULE, limits=LIMITS, rnd=1, steps=8, run="run-a"):
    return ledger.spend_round(run, schedule, limits, 160, rnd, steps, "fp")


# -- the ledger only grows ----------------------------------------------------------
def test_a_negative_entry_cannot_cancel_a_spent_round(tmp_path):
    """The reported attack: 40 steps at epsilon 7.95, then -40 steps read 0.0."""
    ledger = PrivacyLedger(tmp_path, "h")
    _, eps = ledger.spend_round("run-a", SCHEDULE, LIMITS, 160, 1, 40, "fp")
    assert eps == pytest.approx(7.95, abs=0.01)
    for bad in (-40, 0, 1.5, True, "40"):
        with pytest.raises(InvalidEntry):
            LedgerEntry("run-a", 2, 1.0, 0.25, bad, "fp")
    with pytest.raises(InvalidEntry):
        ledger.spend_round("run-a", SCHEDULE, LIMITS, 160, 2, -40, "fp")
    # the accountant never nets entries either
    with pytest.raises(ValueError):
        merged([(1.0, 0.25, 40), (1.0, 0.25, -40)])
    assert PrivacyLedger(tmp_path, "h").epsilon(1e-3) == pytest.approx(eps)


@pytest.mark.parametrize(
    "field,value",
    [("steps", -40), ("steps", 0), ("noise_multiplier", 0.0), ("sample_rate", 1.5)],
)
def test_a_ledger_file_holding_an_impossible_entry_is_named_and_refused(
    tmp_path, field, value
):
    ledger = PrivacyLedger(tmp_path, "h")
    ledger.record(LedgerEntry("r", 1, 1.0, 0.25, 40, "fp"))
    path = tmp_path / LEDGER_NAME
    doc = json.loads(path.read_text())
    doc.pop("sha256")
    doc["entries"].append({**doc["entries"][0], "round": 2, field: value})
    doc["sha256"] = PrivacyLedger._digest(doc)  # a consistent, edited file
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError) as err:
        PrivacyLedger(tmp_path, "h")
    assert "entry 2" in str(err.value) and "restore" in str(err.value)


def test_a_ledger_that_is_not_an_object_is_damaged_not_a_crash(tmp_path):
    (tmp_path / LEDGER_NAME).write_text("[1, 2, 3]")
    with pytest.raises(LedgerError, match="not a kidneyfl ledger"):
        PrivacyLedger(tmp_path, "h")


# -- a calibration is bound to its run and schedule ----------------------------------
def test_the_same_run_id_with_another_schedule_is_refused_and_nothing_changes(
    tmp_path,
):
    ledger = PrivacyLedger(tmp_path, "h")
    _spend(ledger)
    before = (tmp_path / LEDGER_NAME).read_bytes()
    for change in (
        {"total_rounds": 1},
        {"target_epsilon": 9.0},
        {"batch_size": 8},
        {"local_epochs": 1},
        {"fine_tune_steps": 100},
    ):
        other = RunSchedule(**{**SCHEDULE.__dict__, **change})
        with pytest.raises(RequestRefused) as err:
            _spend(ledger, schedule=other, rnd=2)
        assert err.value.code == "request-invalid"
    assert (tmp_path / LEDGER_NAME).read_bytes() == before


def test_noise_is_never_below_the_sites_floor(tmp_path):
    generous = RunSchedule(**{**SCHEDULE.__dict__, "target_epsilon": 9.9})
    limits = SiteLimits(max_epsilon=10.0, run_epsilon=10.0, min_noise=2.0)
    cal, eps = _spend(PrivacyLedger(tmp_path, "h"), schedule=generous, limits=limits)
    assert cal.noise_multiplier == 2.0  # raised: less epsilon than the target
    assert eps < epsilon_for([(1.0, 0.25, 8)], 1e-3)
    # a calibration recorded below a floor raised since is refused, not used
    stricter = SiteLimits(max_epsilon=10.0, run_epsilon=10.0, min_noise=3.0)
    with pytest.raises(RequestRefused, match="floor"):
        _spend(PrivacyLedger(tmp_path, "h"), generous, stricter, rnd=2)


def test_a_run_never_takes_more_steps_than_it_was_calibrated_for(tmp_path):
    ledger = PrivacyLedger(tmp_path, "h")
    one_round = RunSchedule(**{**SCHEDULE.__dict__, "total_rounds": 1})
    cal, _ = _spend(ledger, schedule=one_round)
    assert cal.planned_steps == 8
    with pytest.raises(RequestRefused) as err:  # a replayed or extra round
        _spend(ledger, schedule=one_round, rnd=2)
    assert err.value.code == "limit-exceeded"
    assert len(PrivacyLedger(tmp_path, "h").entries) == 1


def test_the_per_run_limit_refuses_a_larger_target(tmp_path):
    limits = SiteLimits(max_epsilon=10.0, run_epsilon=4.0, min_noise=0.3)
    with pytest.raises(RequestRefused) as err:
        _spend(PrivacyLedger(tmp_path, "h"), limits=limits)
    assert err.value.code == "limit-exceeded"
    assert not (tmp_path / LEDGER_NAME).exists()  # nothing calibrated or spent


def test_the_site_yaml_keeps_the_per_run_limit_under_the_ceiling(tmp_path):
    path = write_site_yaml(
        tmp_path,
        "a",
        generate=False,
        privacy={"max_epsilon": 5, "delta": 1e-3, "max_epsilon_per_run": 6},
    )
    with pytest.raises(Exception, match="max_epsilon_per_run"):
        load_site_config(path)


# -- the steps recorded are the steps run ------------------------------------------
def test_dp_training_runs_exactly_the_steps_the_ledger_records(monkeypatch):
    """Opacus' sampler runs int(1/q) batches an epoch: 92 for 93 cases at batch 1."""
    n = 93
    q, per_epoch = poisson_schedule(n, 1)
    assert per_epoch == 93 and int(1 / q) == 92  # the floating-point trap
    data = torch.utils.data.TensorDataset(torch.randn(n, 4), torch.randn(n, 1))
    ran = []
    step = train_mod._step
    monkeypatch.setattr(train_mod, "_step", lambda *a: (ran.append(1), step(*a)))
    stats = train_mod.local_train(
        torch.nn.Linear(4, 1),
        data,
        torch.nn.MSELoss(),
        epochs=2,
        batch_size=1,
        learning_rate=0.01,
        optimizer="sgd",
        device=torch.device("cpu"),
        seed=0,
        dp=DPSpec(1.0, 1.0, "hooks"),
        max_steps=2 * per_epoch,  # what train_round records before training
    )
    assert stats.steps == len(ran) == 2 * per_epoch


# -- the request's numbers --------------------------------------------------------
PLAN = {**TINY_PLAN, "dp-target-epsilon": 20.0, "local-epochs": 1}


def _train(tmp_path, plan=PLAN, **config):
    yaml_path = write_site_yaml(tmp_path, "a", cases=5)
    msg = site_message("train", ArrayRecord(build_model("unet-tiny").state_dict()), 1)
    for k, v in config.items():
        if v is None:
            del msg.content[wire.CONFIG][k]
        else:
            msg.content[wire.CONFIG][k] = v
    reply = site_app.train(msg, site_context(yaml_path, plan))
    return reply, load_site_config(yaml_path)


@pytest.mark.parametrize(
    "config",
    [
        {wire.TOTAL_ROUNDS: 0},  # the reported attack: noise calibrated to ~0.001
        {wire.TOTAL_ROUNDS: -3},
        {wire.TOTAL_ROUNDS: 2.0},
        {wire.TOTAL_ROUNDS: None},
        {wire.GLOBAL_ROUND: -1},
        {wire.GLOBAL_ROUND: "1"},
        {wire.RUN_ID: "../../etc"},
        {wire.RUN_ID: "a/b"},
        {wire.RUN_ID: None},
        {wire.PROXIMAL_MU: float("nan")},
        {wire.MIN_CASES_FOR_AGGREGATES: -1},
    ],
    ids=str,
)
def test_a_bad_number_is_refused_before_anything_is_calibrated(tmp_path, config):
    reply, site = _train(tmp_path, **config)
    assert reply.content[wire.SITE][wire.REFUSAL_CODE] == "request-invalid"
    assert not (site.state_dir / LEDGER_NAME).exists()


@pytest.mark.parametrize(
    "plan",
    [
        {**PLAN, "dp-target-epsilon": float("inf")},
        {**PLAN, "dp-target-epsilon": float("nan")},
        {**PLAN, "local-epochs": 0},
        {**PLAN, "batch-size": -1},
        {**PLAN, "patch-size": "16,16,4096"},
    ],
    ids=str,
)
def test_a_bad_plan_is_refused_before_anything_is_calibrated(tmp_path, plan):
    reply, site = _train(tmp_path, plan=plan)
    assert reply.content[wire.SITE][wire.REFUSAL_CODE] == "request-invalid"
    assert not (site.state_dir / LEDGER_NAME).exists()


def test_the_sites_own_limits_refuse_a_plan_that_asks_for_more(tmp_path):
    yaml_path = write_site_yaml(
        tmp_path,
        "a",
        generate=False,
        privacy={**DEFAULT_PRIVACY, "max_rounds_per_run": 3},
    )
    site = load_site_config(yaml_path)
    plan = load_plan(PLAN)
    cfg = {wire.RUN_ID: "r", wire.GLOBAL_ROUND: 1, wire.TOTAL_ROUNDS: 4}
    with pytest.raises(RequestRefused) as err:
        check_request("train", cfg, plan, site)
    assert err.value.code == "limit-exceeded"
    assert check_request("train", {**cfg, wire.TOTAL_ROUNDS: 3}, plan, site)
    ft = {**cfg, wire.TOTAL_ROUNDS: 3, wire.FINE_TUNE_STEPS: 5}
    with pytest.raises(RequestRefused):  # more than the plan calibrated for
        check_request("train.finetune", ft, plan, site)


# -- releases per run ---------------------------------------------------------------
def test_releases_past_the_runs_allowance_are_refused(tmp_path):
    counter = QueryCounter(tmp_path)
    assert [counter.take("run-a", 3) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(RequestRefused) as err:
        counter.take("run-a", 3)
    assert err.value.code == "query-limit"
    assert counter.take("run-b", 3) == 1  # counted per run
    (tmp_path / "request-counts.json").write_text("[]")  # damaged: no reset
    with pytest.raises(RequestRefused):
        counter.take("run-c", 3)


def test_an_evaluate_past_the_allowance_is_refused_at_the_site(tmp_path):
    yaml_path = write_site_yaml(
        tmp_path, "a", cases=5, privacy={**DEFAULT_PRIVACY, "max_queries_per_run": 1}
    )
    ctx = site_context(yaml_path, PLAN)
    arrays = ArrayRecord(build_model("unet-tiny").state_dict())
    first = site_app.evaluate(site_message("evaluate", arrays, 1), ctx)
    assert wire.REFUSED not in first.content[wire.METRICS]
    second = site_app.evaluate(site_message("evaluate", arrays, 2), ctx)
    assert second.content[wire.SITE][wire.REFUSAL_CODE] == "query-limit"
    assert (
        second.content[wire.SITE][wire.REFUSAL_REASON]
        == (wire.REFUSAL_CODES["query-limit"])
    )


# -- run ids never name files ----------------------------------------------------
@pytest.mark.parametrize("run", ["../../escape", "a/b", "..", ".", "x" * 300])
def test_a_run_id_never_names_a_file_as_given(tmp_path, run):
    site = load_site_config(write_site_yaml(tmp_path, "a", generate=False))
    folder = personal_dir(site, run)
    assert folder.parent == site.state_dir / "personal"
    assert folder.name == run_key(run) == hashlib.sha256(run.encode()).hexdigest()[:24]
    assert (folder / "run-id.txt").read_text().strip() == run


def test_a_format_2_ledger_keeps_its_run_bound_to_target_and_delta(tmp_path):
    """Ledgers written before the schedule was recorded still read, and their
    runs keep the target and delta they were calibrated for."""
    ledger = PrivacyLedger(tmp_path, "h")
    _spend(ledger)
    path = tmp_path / LEDGER_NAME
    doc = json.loads(path.read_text())
    doc.pop("sha256")
    doc["format"] = "kidneyfl-privacy-ledger/2"
    for cal in doc["calibrations"].values():
        del cal["schedule"]
    doc["sha256"] = PrivacyLedger._digest(doc)
    path.write_text(json.dumps(doc))
    old = PrivacyLedger(tmp_path, "h")
    _spend(old, rnd=2)  # same target and delta: the same run goes on
    other = RunSchedule(**{**SCHEDULE.__dict__, "target_epsilon": 9.0})
    with pytest.raises(RequestRefused):
        _spend(PrivacyLedger(tmp_path, "h"), schedule=other, rnd=3)
