"""The site's one edge (issue 27): whatever fails at a site, at whichever layer
(privacy ledger, audit log, contract check, data loading, model building, the
deployment gate's own steps, Flower's runner), the coordinator gets a refusal
with a code of ``wire.REFUSAL_CODES`` and exactly that code's sentence, and no
string of the reply carries a path, a case id or the exception's class; the
full cause stays in the site's log (and its audit log, when that works)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.fab import Fab

from client import app as site_app
from client import edge, gate
from client.audit_log import AuditLog
from client.privacy.ledger import LEDGER_NAME, PrivacyLedger
from client.tasks.segmentation.task import SegmentationTask
from common import wire
from common.config import load_site_config
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
HANDLERS = {
    "train": site_app.train,
    "train.finetune": site_app.fine_tune,
    "evaluate": site_app.evaluate,
    "query": site_app.fingerprint,
}
SECRET = "/secret/path/case_00001/imaging.nii.gz"
# Never in a reply: the words of a traceback or of the exceptions raised here.
NEVER = (
    "case_0",
    "/secret",
    "Traceback",
    "Errno",
    "Error:",
    "FileNotFoundError",
    "PermissionError",
    "IsADirectoryError",
    "OSError",
    "TypeError",
    "KeyError",
    "ValueError",
    "RuntimeError",
    "LedgerError",
    "LedgerUnreadable",
    "AuditError",
    "FailedReply",
)


def reply_strings(reply: Message) -> list[str]:
    """Every string a reply carries: record names, keys and values, or the
    error's reason."""
    if reply.has_error():
        return [reply.error.reason]
    content = reply.content
    out: list[str] = list(content.array_records)
    for records in (content.config_records, content.metric_records):
        for name, record in records.items():
            out.append(name)
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                out += [key, *(str(v) for v in values)]
    return out


def assert_fixed_refusal(reply: Message, code: str | set[str], *secrets: str) -> str:
    """``reply`` is a refusal with a known code and its sentence, naming nothing."""
    assert not reply.has_error(), reply.error.reason
    assert reply.content[wire.METRICS][wire.REFUSED] == 1
    site = reply.content[wire.SITE]
    got = site[wire.REFUSAL_CODE]
    assert got in wire.REFUSAL_CODES
    assert got in ({code} if isinstance(code, str) else code), got
    assert site[wire.REFUSAL_REASON] == wire.REFUSAL_CODES[got]
    assert not reply.content.array_records
    for text in reply_strings(reply):
        for word in (*NEVER, *secrets):
            assert word not in text, (word, text)
    return got


def _site(tmp_path: Path, data: bool = False) -> Path:
    privacy = {"enabled": True, "max_epsilon": 100.0, "delta": 1e-3}
    return write_site_yaml(tmp_path, "a", cases=4, privacy=privacy, generate=data)


def _ask(kind: str, yaml_path: Path) -> Message:
    msg = site_message(kind, ArrayRecord(), 1)
    msg.content[wire.CONFIG][wire.FINGERPRINT_MIN_CASES] = 1
    plan = PLAN
    if kind == "train.finetune":  # the steps the plan calibrated for, no more
        plan = {**PLAN, "fine-tune-steps": 1}
        msg.content[wire.CONFIG][wire.FINE_TUNE_STEPS] = 1
    return HANDLERS[kind](msg, site_context(yaml_path, plan))


def _entries(yaml_path: Path) -> list[dict]:
    """The audit log's outcomes; each outcome of the app's handlers follows the
    entry written when its request arrived, before any work."""
    entries = AuditLog(load_site_config(yaml_path).state_dir).entries()
    out = []
    for i, e in enumerate(entries):
        if e["decision"] == "arrived":
            continue
        if e["where"] == "app":
            before = entries[i - 1] if i else {}
            assert before.get("decision") == "arrived", entries
            assert before["message_id"] == e["message_id"]
        out.append(e)
    return out


@pytest.fixture
def site_log(caplog: pytest.LogCaptureFixture):
    """The site's own log (``kidneyfl.*``, which does not propagate to the root)."""
    logger = logging.getLogger("kidneyfl")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


# -- the layers, through the ClientApp's handlers (simulation, and the bundle's
# own handlers in deployment) -------------------------------------------------------
def _ledger_is_a_directory(state: Path, monkeypatch) -> None:
    (state / LEDGER_NAME).mkdir(parents=True)


def _ledger_is_a_list(state: Path, monkeypatch) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / LEDGER_NAME).write_text(json.dumps([{"entries": []}]))


def _ledger_not_permitted(state: Path, monkeypatch) -> None:
    # tests run as root, so chmod 000 would not stop the read
    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", f"/secret/{LEDGER_NAME}")

    monkeypatch.setattr(PrivacyLedger, "epsilon", denied)


@pytest.mark.parametrize("kind", sorted(HANDLERS))
@pytest.mark.parametrize(
    "damage", [_ledger_is_a_directory, _ledger_is_a_list, _ledger_not_permitted]
)
def test_a_ledger_that_cannot_be_read(tmp_path, monkeypatch, site_log, kind, damage):
    yaml_path = _site(tmp_path)
    state = load_site_config(yaml_path).state_dir
    damage(state, monkeypatch)
    reply = _ask(kind, yaml_path)
    assert_fixed_refusal(reply, "ledger-damaged", str(tmp_path))
    # the cause, in full, stays at the site: its log and its audit log
    assert "LedgerUnreadable" in site_log.text
    (entry,) = _entries(yaml_path)
    assert entry["decision"] == "failed" and entry["where"] == "app"
    assert entry["reason"].startswith("ledger-damaged")
    assert entry["epsilon_before"] is None and entry["epsilon_after"] is None


def _append_fails(state: Path, monkeypatch) -> None:
    def fail(self, **fields):
        raise OSError("/secret/state/audit-log.jsonl for case_00002: disk full")

    monkeypatch.setattr(AuditLog, "append", fail)


def _audit_is_a_directory(state: Path, monkeypatch) -> None:
    (state / "audit-log.jsonl").mkdir(parents=True)


@pytest.mark.parametrize("kind", sorted(HANDLERS))
@pytest.mark.parametrize("damage", [_append_fails, _audit_is_a_directory])
def test_an_audit_log_that_cannot_be_written(
    tmp_path, monkeypatch, site_log, kind, damage
):
    """The site cannot record: it says so in its log and answers the refusal."""
    yaml_path = _site(tmp_path)
    damage(load_site_config(yaml_path).state_dir, monkeypatch)
    reply = _ask(kind, yaml_path)
    assert_fixed_refusal(reply, "internal-error", str(tmp_path))
    assert "audit log could not record" in site_log.text
    assert "audit-log.jsonl" in site_log.text  # the cause, at the site only


@pytest.mark.parametrize("kind", sorted(HANDLERS))
def test_a_contract_check_that_raises(tmp_path, monkeypatch, site_log, kind):
    def broken(*args, **kwargs):
        raise RuntimeError(f"{SECRET}: contract table unreadable")

    monkeypatch.setattr(edge, "check_reply", broken)
    yaml_path = _site(tmp_path)
    reply = _ask(kind, yaml_path)
    assert_fixed_refusal(reply, "internal-error", str(tmp_path))
    assert SECRET in site_log.text
    (entry,) = _entries(yaml_path)
    assert entry["decision"] == "failed" and SECRET in entry["reason"]


@pytest.mark.parametrize("kind", sorted(HANDLERS))
def test_data_that_fail_to_load(tmp_path, monkeypatch, site_log, kind):
    def missing(*args, **kwargs):
        raise FileNotFoundError(SECRET)

    # train, fine-tune and evaluate load through the task; query reads the cases
    monkeypatch.setattr(SegmentationTask, "load_data", missing)
    monkeypatch.setattr("client.evaluate_round.load_site_cases", missing)
    yaml_path = _site(tmp_path)
    reply = _ask(kind, yaml_path)
    assert_fixed_refusal(reply, {"internal-error", "data-unusable"}, str(tmp_path))
    assert SECRET in site_log.text
    (entry,) = _entries(yaml_path)
    assert entry["decision"] in {"failed", "refused"}


@pytest.mark.parametrize("kind", ["evaluate", "train"])
def test_a_model_that_fails_to_build(tmp_path, monkeypatch, site_log, kind):
    def broken(*args, **kwargs):
        raise ValueError("/secret/models/case_00007/weights.pt: bad shape (3, 7)")

    monkeypatch.setattr("client.prepare.build_plan_model", broken)
    yaml_path = _site(tmp_path, data=True)
    reply = _ask(kind, yaml_path)
    assert_fixed_refusal(reply, "internal-error", str(tmp_path), "(3, 7)")
    assert "case_00007" in site_log.text
    (entry,) = _entries(yaml_path)
    assert entry["decision"] == "failed" and "case_00007" in entry["reason"]


def test_a_handler_error_reply_never_leaves(tmp_path):
    """A reply that is an error (free text) is replaced at the edge."""

    def erring(msg, context):
        reason = f"<class 'OSError'>:<'{SECRET}'>"
        return Message(Error(code=1, reason=reason), reply_to=msg)

    handler = edge.governed(site_app.site_yaml)(erring)
    yaml_path = _site(tmp_path)
    reply = handler(
        site_message("evaluate", ArrayRecord(), 1), site_context(yaml_path, PLAN)
    )
    assert_fixed_refusal(reply, "internal-error")
    (entry,) = _entries(yaml_path)
    assert entry["decision"] == "failed" and SECRET in entry["reason"]


# -- the deployment gate's hooks ----------------------------------------------------
def _runner(yaml_path: Path, monkeypatch) -> tuple[SimpleNamespace, gate._Task, dict]:
    """Flower's runner module as the gate hooks it, with a query waiting."""
    import flwr.supercore.exit as flwr_exit_mod

    def no_timer_exit(code: int, *args: object, **kwargs: object) -> None:
        raise SystemExit(int(code))  # Flower's own also arms an os._exit timer

    monkeypatch.setattr(flwr_exit_mod, "flwr_exit", no_timer_exit)
    monkeypatch.delenv(gate.APP_HASH_ENV, raising=False)
    monkeypatch.delenv(gate.AUDITED_ENV, raising=False)
    msg = site_message("query", ArrayRecord(), 1)
    out: dict = {"pushed": [], "statuses": [], "msg": msg}
    ctx = site_context(yaml_path, PLAN)
    run = SimpleNamespace(run_id=1, fab_id="kidneyfl/kidneyfl", fab_version="1.0.0")
    rc = SimpleNamespace(
        __name__="fake_runner",
        pull_task_input=lambda client: (msg, ctx, run, Fab("0" * 64, b"bundle", {})),
        install_from_fab=lambda content, *a, **kw: None,
        push_message=lambda client, reply, c: out["pushed"].append(reply),
        push_task_output=lambda client, c, sub, details: out["statuses"].append(
            (sub, details)
        ),
        run_clientapp=lambda **kw: None,
    )
    task = gate._Task(load_site_config(yaml_path))
    gate._hooks(task, rc)
    return rc, task, out


def test_gate_pull_with_an_unreadable_ledger_answers_the_refusal(tmp_path, monkeypatch):
    yaml_path = _site(tmp_path)
    _ledger_is_a_list(load_site_config(yaml_path).state_dir, monkeypatch)
    rc, _, out = _runner(yaml_path, monkeypatch)
    with pytest.raises(SystemExit) as ended:
        rc.pull_task_input(None)
    assert ended.value.code == 0 and out["statuses"] == [("completed", "")]
    (reply,) = out["pushed"]
    assert_fixed_refusal(reply, "ledger-damaged", str(tmp_path))
    (entry,) = _entries(yaml_path)
    assert (entry["decision"], entry["where"]) == ("failed", "gate")


def test_gate_pull_with_any_failure_answers_the_refusal(tmp_path, monkeypatch):
    def denied(site):
        raise PermissionError(13, "Permission denied", SECRET)

    monkeypatch.setattr(gate, "spent_epsilon", denied)
    rc, _, out = _runner(_site(tmp_path), monkeypatch)
    with pytest.raises(SystemExit):
        rc.pull_task_input(None)
    (reply,) = out["pushed"]
    assert_fixed_refusal(reply, "internal-error")


def test_gate_push_when_the_audit_log_fails(tmp_path, monkeypatch, site_log):
    yaml_path = _site(tmp_path)
    rc, _, out = _runner(yaml_path, monkeypatch)
    message, ctx, _, _ = rc.pull_task_input(None)
    _append_fails(tmp_path, monkeypatch)
    fine = Message(
        RecordDict(
            {
                wire.METRICS: MetricRecord({wire.FP_N_CASES: 3.0}),
                wire.SITE: ConfigRecord({wire.SITE_NAME: "a"}),
            }
        ),
        reply_to=message,
    )
    rc.push_message(None, fine, ctx)
    (reply,) = out["pushed"]  # unrecorded, it does not leave: the refusal does
    assert_fixed_refusal(reply, "internal-error")
    assert "audit log could not record" in site_log.text


def test_gate_push_replaces_flowers_error_reply(tmp_path, monkeypatch):
    """Flower's runner turns an exception of the app into an error reply whose
    reason is the exception's class and text."""
    yaml_path = _site(tmp_path)
    rc, _, out = _runner(yaml_path, monkeypatch)
    message, ctx, _, _ = rc.pull_task_input(None)
    flowers = Message(
        Error(code=1, reason=f"<class 'FileNotFoundError'>:<'{SECRET}'>"),
        reply_to=message,
    )
    rc.push_message(None, flowers, ctx)
    (reply,) = out["pushed"]
    assert_fixed_refusal(reply, "internal-error")
    (entry,) = _entries(yaml_path)
    assert entry["decision"] == "failed" and SECRET in entry["reason"]


def test_gate_install_failure_answers_the_refusal_and_nothing_more(
    tmp_path, monkeypatch
):
    def broken(*args, **kwargs):
        raise KeyError(f"/secret/flwr/apps/{SECRET}")

    monkeypatch.setattr(gate, "check_approved", broken)
    rc, _, out = _runner(_site(tmp_path), monkeypatch)
    message, ctx, _, fab = rc.pull_task_input(None)
    with pytest.raises(SystemExit):
        rc.install_from_fab(fab.content, skip_prompt=True)
    assert out["statuses"] == [("completed", "")]
    # what Flower's runner would push after the gate ended the task: dropped
    rc.push_message(None, Message(Error(code=1, reason=SECRET), reply_to=message), ctx)
    (reply,) = out["pushed"]
    assert_fixed_refusal(reply, "internal-error")
