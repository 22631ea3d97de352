"""What each reply kind carries out of a site (docs/privacy.md's table), called
directly on the ClientApp handlers: the DP train reply, the site's choices for
validation metrics and the fingerprint, and error replies that name no path,
case or value from the data."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from flwr.app import ArrayRecord

from client import app as site_app
from client.audit_log import AuditLog
from client.contract import leaks
from common import wire
from common.config import load_site_config
from common.models import build_model
from tests.fakes import TINY_PLAN, site_context, site_message, write_site_yaml

pytestmark = pytest.mark.usefixtures("task_identity")

PLAN = {
    **TINY_PLAN,
    "model": "unet-tiny",
    "num-server-rounds": 1,
    "local-epochs": 1,
    "learning-rate": 0.003,
    "dp-target-epsilon": 20.0,
}


def _ctx(yaml_path, plan=PLAN):
    return site_context(yaml_path, plan)


def _arrays() -> ArrayRecord:
    return ArrayRecord(build_model("unet-tiny").state_dict())


def _text(reply) -> str:
    """Everything in a reply except its arrays, as text."""
    parts = [dict(r) for r in reply.content.metric_records.values()]
    parts += [dict(r) for r in reply.content.config_records.values()]
    return json.dumps(parts, default=str)


def _site(tmp_path, name="a", cases=5, **privacy):
    base = {"enabled": True, "max_epsilon": 100.0, "delta": 1e-3}
    return write_site_yaml(tmp_path, name, cases=cases, privacy=base | privacy)


def test_dp_train_reply_carries_no_training_loss(tmp_path):
    dp_yaml = _site(tmp_path, "dp")
    reply = site_app.train(site_message("train", _arrays(), 1), _ctx(dp_yaml))
    m = reply.content[wire.METRICS]
    assert m[wire.REFUSED] == 0 and m[wire.DP_ENABLED] == 1
    assert wire.TRAIN_LOSS not in m  # computed on patients without noise
    assert 0 < m[wire.EPSILON] <= 20.0
    ledger = json.loads((tmp_path / "state" / "dp" / "privacy-ledger.json").read_text())
    assert ledger["accountant"] == "prv" and len(ledger["entries"]) == 1
    # without DP the loss is the site's to send, and it is sent
    plain = write_site_yaml(tmp_path, "plain", cases=5, privacy={"enabled": False})
    reply = site_app.train(site_message("train", _arrays(), 1), _ctx(plain))
    assert wire.TRAIN_LOSS in reply.content[wire.METRICS]


@pytest.mark.parametrize(
    "choice", [{"share_validation_metrics": False}, {"min_cases_for_aggregates": 3}]
)
def test_validation_metrics_are_the_sites_choice(tmp_path, choice):
    # 5 cases at validation_fraction 0.34: 2 validation patients
    yaml_path = _site(tmp_path, **choice)
    reply = site_app.evaluate(site_message("evaluate", _arrays(), 1), _ctx(yaml_path))
    m = dict(reply.content[wire.METRICS])
    assert m[wire.METRICS_WITHHELD] == 1 and m.get(wire.REFUSED, 0) == 0
    assert not [k for k in m if k.startswith(wire.DICE_PREFIX)]
    assert wire.EVAL_LOSS not in m
    # the floor is the site's: a coordinator asking for less does not lower it
    msg = site_message("evaluate", _arrays(), 1)
    msg.content[wire.CONFIG][wire.MIN_CASES_FOR_AGGREGATES] = 1
    again = dict(site_app.evaluate(msg, _ctx(yaml_path)).content[wire.METRICS])
    assert again[wire.METRICS_WITHHELD] == 1


def test_validation_metrics_shared_at_or_above_the_floor(tmp_path):
    yaml_path = _site(tmp_path, min_cases_for_aggregates=2)
    m = site_app.evaluate(site_message("evaluate", _arrays(), 1), _ctx(yaml_path))
    m = dict(m.content[wire.METRICS])
    assert wire.METRICS_WITHHELD not in m and wire.dice_key("kidney") in m
    # and a coordinator may raise the floor
    msg = site_message("evaluate", _arrays(), 1)
    msg.content[wire.CONFIG][wire.MIN_CASES_FOR_AGGREGATES] = 3
    raised = dict(site_app.evaluate(msg, _ctx(yaml_path)).content[wire.METRICS])
    assert raised[wire.METRICS_WITHHELD] == 1


def _query(min_cases: int):
    msg = site_message("query", _arrays(), 0)
    msg.content[wire.CONFIG][wire.FINGERPRINT_MIN_CASES] = min_cases
    return msg


@pytest.mark.parametrize(
    "choice, code",
    [
        ({"share_fingerprint": False}, "not-shared"),
        ({"min_cases_for_aggregates": 6}, "too-few-cases"),
    ],
)
def test_fingerprint_is_the_sites_choice(tmp_path, choice, code):
    yaml_path = _site(tmp_path, **choice)
    reply = site_app.fingerprint(_query(1), _ctx(yaml_path))
    site = reply.content[wire.SITE]
    assert reply.content[wire.METRICS][wire.REFUSED] == 1
    assert site[wire.REFUSAL_CODE] == code
    assert wire.FP_HIST not in reply.content[wire.METRICS]


def _assert_anonymous(reply, *secrets: str) -> None:
    text = _text(reply)
    assert leaks(text.replace('"refusal-code"', "")) is None, text
    for s in secrets:
        assert s not in text


def test_evaluate_on_a_site_whose_data_has_gone_refuses_with_a_code(tmp_path):
    yaml_path = _site(tmp_path)
    root = load_site_config(yaml_path).data.root
    shutil.rmtree(root)
    reply = site_app.evaluate(site_message("evaluate", _arrays(), 1), _ctx(yaml_path))
    assert reply.content[wire.METRICS][wire.REFUSED] == 1
    site = reply.content[wire.SITE]
    assert site[wire.REFUSAL_CODE] == "data-unusable"
    assert site[wire.REFUSAL_REASON] == wire.REFUSAL_CODES["data-unusable"]
    _assert_anonymous(reply, str(root), str(tmp_path))


def test_evaluate_with_a_corrupt_case_names_nothing(tmp_path):
    yaml_path = _site(tmp_path, cases=6)
    root = load_site_config(yaml_path).data.root
    first = sorted(root.glob("case_*"))[0]
    image = first / "imaging.nii.gz"
    image.write_bytes(image.read_bytes()[:200])  # truncated
    reply = site_app.evaluate(site_message("evaluate", _arrays(), 1), _ctx(yaml_path))
    _assert_anonymous(reply, first.name, str(tmp_path))


def test_an_unexpected_failure_sends_a_code_not_the_exception(tmp_path, monkeypatch):
    from client.tasks.segmentation.task import SegmentationTask

    secret = "/srv/pacs/case_00042/imaging.nii.gz: HU 3071 at voxel 12,40,7"

    def boom(*args, **kwargs):
        raise RuntimeError(secret)

    monkeypatch.setattr(SegmentationTask, "evaluate", boom)
    yaml_path = _site(tmp_path, min_cases_for_aggregates=1)
    reply = site_app.evaluate(site_message("evaluate", _arrays(), 1), _ctx(yaml_path))
    assert not reply.has_error()
    site = reply.content[wire.SITE]
    assert site[wire.REFUSAL_CODE] == "internal-error"
    _assert_anonymous(reply, "pacs", "00042", "3071")
    # the site's own audit log records the refusal
    audit = (tmp_path / "state" / "a").rglob("*.jsonl")
    sentence = wire.REFUSAL_CODES["internal-error"]
    assert any(sentence in p.read_text() for p in audit)


HANDLERS = {
    "train": site_app.train,
    "train.finetune": site_app.fine_tune,
    "evaluate": site_app.evaluate,
    "query": site_app.fingerprint,
}


@pytest.mark.parametrize("kind", sorted(HANDLERS))
def test_every_request_refuses_the_same_way_when_the_data_has_gone(tmp_path, kind):
    yaml_path = _site(tmp_path)
    site = load_site_config(yaml_path)
    shutil.rmtree(site.data.root)
    msg = site_message(kind, _arrays(), 1)
    msg.content[wire.CONFIG][wire.FINGERPRINT_MIN_CASES] = 1
    plan = PLAN
    if kind == "train.finetune":  # a valid fine-tune: the plan's steps, no more
        plan = {**PLAN, "fine-tune-steps": 1}
        msg.content[wire.CONFIG][wire.FINE_TUNE_STEPS] = 1
    reply = HANDLERS[kind](msg, _ctx(yaml_path, plan))
    assert not reply.has_error() and reply.content[wire.METRICS][wire.REFUSED] == 1
    record = reply.content[wire.SITE]
    assert record[wire.REFUSAL_CODE] == "data-unusable"
    assert record[wire.REFUSAL_REASON] == wire.REFUSAL_CODES["data-unusable"]
    _assert_anonymous(reply, str(site.data.root), str(tmp_path))
    (entry,) = [
        e for e in AuditLog(site.state_dir).entries() if e["decision"] != "arrived"
    ]
    assert entry["decision"] == "refused" and entry["message_type"] == kind
    # refused before training: nothing was spent
    assert not (site.state_dir / "privacy-ledger.json").exists()


def test_evaluate_with_a_plan_for_another_task_refuses_and_names_no_case(
    tmp_path, caplog
):
    yaml_path = _site(tmp_path)
    site = load_site_config(yaml_path)
    case = sorted(site.data.root.glob("case_*"))[0].name
    plan = {**PLAN, "task": "classification", "model": "resnet-tiny"}
    with caplog.at_level(logging.WARNING):
        reply = site_app.evaluate(
            site_message("evaluate", _arrays(), 1), _ctx(yaml_path, plan)
        )
    record = reply.content[wire.SITE]
    assert reply.content[wire.METRICS][wire.REFUSED] == 1
    assert record[wire.REFUSAL_CODE] == "data-unusable"
    assert record[wire.REFUSAL_REASON] == wire.REFUSAL_CODES["data-unusable"]
    _assert_anonymous(reply, case, str(tmp_path))
    # the cause, with the folder that does not fit, stays in the site's own log
    assert any(case in r.getMessage() for r in caplog.records)
    (entry,) = [
        e for e in AuditLog(site.state_dir).entries() if e["decision"] != "arrived"
    ]
    assert entry["decision"] == "refused" and case not in json.dumps(entry)


def test_prognosis_train_at_a_site_without_outcomes_refuses_and_spends_nothing(
    tmp_path, site_records
):
    """A coordinator's prognosis plan at a site whose data carry no outcomes:
    the refusal names no file (the site's log does), and nothing is spent."""
    yaml_path = _site(tmp_path)
    site = load_site_config(yaml_path)
    plan = {**PLAN, "task": "prognosis", "model": "prognosis-linear"}
    arrays = ArrayRecord(build_model("prognosis-linear", 1, 6).state_dict())
    reply = site_app.train(site_message("train", arrays, 1), _ctx(yaml_path, plan))
    assert reply.content[wire.METRICS][wire.REFUSED] == 1
    record = reply.content[wire.SITE]
    assert record[wire.REFUSAL_CODE] == "data-unusable"
    _assert_anonymous(reply, str(site.data.root), str(tmp_path))
    # the site's own log (the message or the exception it carries)
    logged = " ".join(
        r.getMessage() + (site_records.handler.format(r) if r.exc_info else "")
        for r in site_records.records
    )
    assert "outcomes.csv" in logged
    assert not (site.state_dir / "privacy-ledger.json").exists()
