"""Governance: approved bundles, the gate's hooks, the reply contract, the audit log."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import marshal
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.fab import Fab

from cli.main import main as cli
from client import edge, gate
from client.audit_log import AuditLog
from client.contract import expected_arrays
from client.governance import AppRefused, approvals_report, approve, bundle_hash
from client.privacy.ledger import PrivacyLedger
from common import packing, wire
from common.config import ConfigError, Plan, load_site_config
from common.task_models import build_plan_model
from tests.fakes import write_site_yaml

GOVAPP = Path(__file__).resolve().parents[1] / "govapp"
BIN = Path(sys.executable).parent
PLAN = {
    "model": "unet-tiny",
    "spacing-mm": "6,6,8",
    "patch-size": "32,32,16",
    "batch-size": 2,
    "num-server-rounds": 1,
    "local-epochs": 1,
    "learning-rate": 0.003,
}


def request(mtype: str, content: RecordDict, mid: str = "m1") -> Message:
    """A message as the site receives it (metadata set by the SuperLink)."""
    md = Metadata(
        run_id=7,
        message_id=mid,
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=3600.0,
        message_type=mtype,
    )
    return Message(content, metadata=md)


def context(site_yaml: Path, run_config: dict | None = None) -> Context:
    return Context(
        run_id=7,
        node_id=2,
        node_config={"site-config": str(site_yaml)},
        state=RecordDict(),
        run_config=dict(PLAN if run_config is None else run_config),
    )


@pytest.fixture(scope="module")
def fab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test app bundled by `flwr build`, as a hospital would receive it."""
    out = tmp_path_factory.mktemp("fab")
    res = subprocess.run(
        [str(BIN / "flwr"), "build", "--app", str(GOVAPP)],
        cwd=out,
        capture_output=True,
        text=True,
        env={"FLWR_HOME": str(out / "home"), "PATH": str(BIN)},
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    found = list(out.glob("*.fab")) + list(GOVAPP.glob("*.fab"))
    assert found, res.stdout
    path = out / found[0].name
    if found[0] != path:
        found[0].replace(path)
    return path


@pytest.fixture
def site_yaml(tmp_path: Path) -> Path:
    return write_site_yaml(tmp_path, "hospA", cases=4, generate=False)


# -- approvals ---------------------------------------------------------------------
def test_bundle_hash_is_flowers_fab_hash(fab: Path) -> None:
    digest = bundle_hash(fab)
    assert digest == hashlib.sha256(fab.read_bytes()).hexdigest()
    assert fab.stem.endswith(digest[:8])  # Flower names the bundle by its hash
    assert bundle_hash(f"sha256:{digest.upper()}") == digest
    with pytest.raises(ValueError, match="neither a bundle file"):
        bundle_hash("not-a-hash")


def test_approve_adds_once_and_lists(site_yaml: Path, fab: Path, capsys) -> None:
    assert load_site_config(site_yaml).governance.require_approval is True
    digest, new = approve(site_yaml, fab)
    assert new and load_site_config(site_yaml).governance.approved_apps == [digest]
    assert approve(site_yaml, digest) == (digest, False)
    assert f"sha256:{digest}" in approvals_report(site_yaml)
    assert cli(["site", "approvals", str(site_yaml)]) == 0
    assert "approval required" in capsys.readouterr().out


OLD = "a" * 64


@pytest.mark.parametrize(
    ("governance", "before"),
    [
        ("", []),
        (
            "governance:  # the data office signs off\n"
            "  approved_apps: []  # none yet\n",
            [],
        ),
        (
            "governance:\n  require_approval: true  # keep on\n"
            f"  approved_apps:\n    # trial 1\n    - {OLD}\n  # end of list\n",
            [OLD],
        ),
        ("governance:\n  require_approval: true\n", []),
        (f"governance:\n  approved_apps:\n  - sha256:{OLD}\n", [f"sha256:{OLD}"]),
    ],
    ids=["no-block", "empty-inline", "block-list", "no-key", "same-indent-items"],
)
def test_approve_keeps_the_operators_comments(
    site_yaml: Path, fab: Path, governance: str, before: list[str]
) -> None:
    text = "# hospital IT: call 555-0100 before changing this file\n"
    text += site_yaml.read_text() + governance
    site_yaml.write_text(text)
    digest, new = approve(site_yaml, fab)
    after = site_yaml.read_text()
    assert new and after.splitlines()[0] == text.splitlines()[0]
    for comment in re.findall(r"#.*", text):
        assert comment in after  # every comment survives
    apps = load_site_config(site_yaml).governance.approved_apps
    assert apps == [*(b.removeprefix("sha256:") for b in before), digest]
    assert yaml.safe_load(after)["governance"]["approved_apps"][-1] == digest


def test_approve_into_an_inline_list_falls_back_to_a_valid_rewrite(
    site_yaml: Path, fab: Path
) -> None:
    site_yaml.write_text(
        site_yaml.read_text() + f'governance: {{approved_apps: ["{OLD}"]}}  # inline\n'
    )
    digest, _ = approve(site_yaml, fab)
    assert load_site_config(site_yaml).governance.approved_apps == [OLD, digest]


def test_approve_the_published_hash(site_yaml: Path, fab: Path, capsys) -> None:
    """A site may approve the consortium's published hash before the bundle
    arrives; with the bundle too, the two must agree."""
    published = bundle_hash(fab)
    args = ["site", "approve", str(site_yaml), "--sha256", f"sha256:{published}"]
    assert cli(args) == 0
    assert f"sha256:{published} approved" in capsys.readouterr().out
    assert load_site_config(site_yaml).governance.approved_apps == [published]
    assert cli([*args[:3], str(fab), *args[3:]]) == 0  # bundle and hash agree
    assert "already approved" in capsys.readouterr().out
    assert cli(["site", "approve", str(site_yaml), "--sha256", "beef"]) == 2
    assert "not a SHA-256 hex digest" in capsys.readouterr().err
    assert cli(["site", "approve", str(site_yaml)]) == 2
    assert "--sha256" in capsys.readouterr().err


def test_a_bundle_that_is_not_the_published_one_is_refused(
    site_yaml: Path, fab: Path, capsys
) -> None:
    before = site_yaml.read_text()
    args = ["site", "approve", str(site_yaml), str(fab), "--sha256", OLD]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"sha256:{bundle_hash(fab)}" in err and f"published sha256:{OLD}" in err
    assert str(fab) in err and "nothing approved" in err
    assert site_yaml.read_text() == before  # neither hash was written
    with pytest.raises(ValueError, match="not the bundle the consortium published"):
        approve(site_yaml, fab, sha256=OLD)


def test_bad_hash_in_yaml_names_key(site_yaml: Path) -> None:
    doc = yaml.safe_load(site_yaml.read_text())
    doc["governance"] = {"approved_apps": ["abc"]}
    site_yaml.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="governance.approved_apps"):
        load_site_config(site_yaml)


# -- the gate, against a real FAB ---------------------------------------------------
def test_flower_runner_calls_the_hooked_steps_in_order() -> None:
    """The gate wraps these names; a Flower upgrade that renames them must fail."""
    from flwr.supernode.runtime import run_clientapp as rc

    src = inspect.getsource(rc.run_clientapp)
    pull = src.index("pull_task_input(client)")
    install = src.index("install_from_fab(fab.content")
    # the folder the gate checks is the one the runner loads from
    folder = src.index("get_project_dir(run.fab_id, run.fab_version, fab.hash_str)")
    load = src.index("load_client_app_fn(")
    push = src.index("push_message(client, reply_message")
    assert pull < install < folder < load < push


GOVAPP_ID, GOVAPP_VERSION = "kidneyfltest/govapp", "0.1.0"


def _no_timer_exit(monkeypatch) -> None:
    """Flower's flwr_exit also arms an os._exit timer, which would end pytest."""
    import flwr.supercore.exit as flwr_exit_mod

    def no_timer_exit(code: int, *args: object, **kwargs: object) -> None:
        raise SystemExit(int(code))

    monkeypatch.setattr(flwr_exit_mod, "flwr_exit", no_timer_exit)


def _run_gate(
    site_yaml: Path,
    fab: Path,
    home: Path,
    monkeypatch,
    fab_id: str = GOVAPP_ID,
    before_load=None,
) -> dict:
    """Drive the hooked runner steps the way run_clientapp does.

    ``fab_id`` is the app the run names; ``before_load(folder)`` runs after
    the gate's install step and before Flower loads the ClientApp.
    """
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.config import get_project_dir

    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setenv("GOV_MARKER_DIR", str(home / "markers"))
    monkeypatch.delenv(gate.APP_HASH_ENV, raising=False)
    _no_timer_exit(monkeypatch)
    content = fab.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    msg = request("query", RecordDict({"config": ConfigRecord({})}))
    run = SimpleNamespace(run_id=7, fab_id=fab_id, fab_version=GOVAPP_VERSION)
    pushed: list[Message] = []
    statuses: list[str] = []
    rc = SimpleNamespace(
        __name__="fake_runner",
        pull_task_input=lambda client: (
            msg,
            context(site_yaml, {}),
            run,
            Fab(digest, content, {}),
        ),
        install_from_fab=install_from_fab,
        push_message=lambda client, reply, ctx: pushed.append(reply),
        push_task_output=lambda client, ctx, sub_status, details: statuses.append(
            sub_status
        ),
        run_clientapp=lambda **kw: None,
    )
    gate._hooks(gate._Task(load_site_config(site_yaml)), rc)
    result: dict = {"pushed": pushed, "digest": digest, "statuses": statuses}
    saved = dict(sys.modules)
    saved_path, saved_hooks = list(sys.path), list(sys.path_hooks)
    saved_cache = dict(sys.path_importer_cache)
    try:
        message, ctx, got_run, got = rc.pull_task_input(None)
        rc.install_from_fab(got.content, skip_prompt=True)
        if before_load is not None:
            before_load(get_project_dir(got_run.fab_id, got_run.fab_version, digest))
        try:
            app = get_load_client_app_fn("", None, True)(
                got_run.fab_id, got_run.fab_version, digest
            )
            reply = app(message=message, context=ctx)
        except Exception as exc:  # what run_clientapp does with it
            from flwr.app import Error

            result["raised"] = exc
            reply = Message(
                Error(code=0, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg
            )
        rc.push_message(None, reply, ctx)
    except SystemExit as exc:  # the gate answered and ended the task itself
        result["exit"] = exc.code
    finally:
        sys.modules.clear()
        sys.modules.update(saved)
        sys.path[:] = saved_path
        sys.path_hooks[:] = saved_hooks
        sys.path_importer_cache.clear()
        sys.path_importer_cache.update(saved_cache)
    return result


def test_unapproved_bundle_never_runs(site_yaml, fab, tmp_path, monkeypatch) -> None:
    home = tmp_path / "flwr"
    res = _run_gate(site_yaml, fab, home, monkeypatch)
    assert res["exit"] == 0 and res["statuses"] == ["completed"]
    (reply,) = res["pushed"]  # the coordinator gets an error reply naming the hash
    reason = reply.error.reason
    assert reply.has_error() and res["digest"] in reason and "hospA" in reason
    assert "/" not in reason
    assert not (home / "markers").exists()  # nothing from the bundle was imported
    assert not (home / "apps").exists()  # nor even unpacked
    (entry,) = AuditLog(load_site_config(site_yaml).state_dir).entries()
    assert entry["decision"] == "refused" and entry["app_hash"] == res["digest"]
    assert entry["where"] == "gate" and entry["message_type"] == "query"


def test_approved_bundle_runs_and_is_recorded(
    site_yaml, fab, tmp_path, monkeypatch
) -> None:
    approve(site_yaml, fab)
    home = tmp_path / "flwr"
    res = _run_gate(site_yaml, fab, home, monkeypatch)
    assert "exit" not in res
    assert len(list((home / "markers").iterdir())) == 1  # its code ran
    (reply,) = res["pushed"]
    assert dict(reply.content["metrics"]) == {"n-cases": 3.0}
    (entry,) = AuditLog(load_site_config(site_yaml).state_dir).entries()
    assert (entry["decision"], entry["app_hash"]) == ("ran", res["digest"])
    assert entry["bytes_sent"] > 0


# -- the installed folder is the approved bundle ------------------------------------
def _installed(home: Path, digest: str) -> Path:
    """Where Flower installs (and later reuses) the govapp bundle."""
    return home / "apps" / f"kidneyfltest.govapp.{GOVAPP_VERSION}.{digest[:8]}"


def _assert_refused_before_import(res: dict, home: Path, site_yaml: Path) -> str:
    """The gate refused with the error naming the hash; nothing was imported."""
    assert res["exit"] == 0 and res["statuses"] == ["completed"], res
    (reply,) = res["pushed"]
    reason = reply.error.reason
    assert reply.has_error() and res["digest"] in reason and "hospA" in reason
    assert "/" not in reason and "govapp" not in reason  # no file is named
    assert not (home / "markers").exists()  # no code of the folder ran
    entry = AuditLog(load_site_config(site_yaml).state_dir).entries()[-1]
    assert (entry["decision"], entry["app_hash"]) == ("refused", res["digest"])
    return reason


def _ran(res: dict, home: Path) -> None:
    assert "exit" not in res and "raised" not in res, res
    (reply,) = res["pushed"]
    assert dict(reply.content["metrics"]) == {"n-cases": 3.0}
    assert [p.name for p in (home / "markers").iterdir()] == [f"imported-{os.getpid()}"]


def test_the_untouched_installed_folder_runs_again(
    site_yaml, fab, tmp_path, monkeypatch
) -> None:
    """The second task reuses Flower's folder; unchanged, it runs, and the
    gate's importer left no bytecode cache in it."""
    approve(site_yaml, fab)
    home = tmp_path / "flwr"
    _ran(_run_gate(site_yaml, fab, home, monkeypatch), home)
    shutil.rmtree(home / "markers")
    again = _run_gate(site_yaml, fab, home, monkeypatch)
    _ran(again, home)  # imported again, from the same folder
    assert not list(_installed(home, again["digest"]).rglob("__pycache__"))
    entries = AuditLog(load_site_config(site_yaml).state_dir).entries()
    assert [e["decision"] for e in entries] == ["ran", "ran"]


def test_a_file_changed_after_install_is_refused(
    site_yaml, fab, tmp_path, monkeypatch
) -> None:
    approve(site_yaml, fab)
    home = tmp_path / "flwr"
    digest = _run_gate(site_yaml, fab, home, monkeypatch)["digest"]
    code = _installed(home, digest) / "govapp" / "client_app.py"
    code.write_text(code.read_text() + "\nUNREVIEWED = True\n")
    shutil.rmtree(home / "markers")
    res = _run_gate(site_yaml, fab, home, monkeypatch)
    reason = _assert_refused_before_import(res, home, site_yaml)
    assert "differs from the approved bundle in 1 file(s)" in reason


def test_a_folder_placed_under_the_approved_short_hash_is_refused(
    site_yaml, fab, tmp_path, monkeypatch
) -> None:
    """Another bundle's files, in the folder Flower would reuse for the
    approved bundle (same app, version and first 8 digits of the hash)."""
    digest, _ = approve(site_yaml, fab)
    home = tmp_path / "flwr"
    folder = _installed(home, digest)
    shutil.copytree(GOVAPP, folder, ignore=shutil.ignore_patterns("*.fab"))
    (folder / "govapp" / "client_app.py").write_text(
        "import os\nfrom pathlib import Path\n"
        "Path(os.environ['GOV_MARKER_DIR']).mkdir(parents=True)\n"
        "(Path(os.environ['GOV_MARKER_DIR']) / 'other-bundle').write_text('ran')\n"
    )
    res = _run_gate(site_yaml, fab, home, monkeypatch)
    _assert_refused_before_import(res, home, site_yaml)


@pytest.mark.parametrize(
    "extra",
    ["govapp/helper.py", "govapp.pth", "govapp/fast.cpython-311-x86_64-linux-gnu.so"],
)
def test_an_extra_file_in_the_folder_is_refused(
    site_yaml, fab, tmp_path, monkeypatch, extra: str
) -> None:
    approve(site_yaml, fab)
    home = tmp_path / "flwr"
    digest = _run_gate(site_yaml, fab, home, monkeypatch)["digest"]
    (_installed(home, digest) / extra).write_text("import os  # not reviewed\n")
    shutil.rmtree(home / "markers")
    res = _run_gate(site_yaml, fab, home, monkeypatch)
    reason = _assert_refused_before_import(res, home, site_yaml)
    assert "in 1 file(s)" in reason


def test_a_forged_bytecode_cache_in_the_folder_never_runs(
    site_yaml, fab, tmp_path, monkeypatch
) -> None:
    """A ``.pyc`` whose header matches the approved source would run in its
    place under Python's own importer; the gate's importer reads sources."""
    approve(site_yaml, fab)
    home = tmp_path / "flwr"
    digest = _run_gate(site_yaml, fab, home, monkeypatch)["digest"]
    folder = _installed(home, digest)
    source = folder / "govapp" / "client_app.py"
    forged = compile(
        "import os\nfrom pathlib import Path\n"
        "Path(os.environ['GOV_MARKER_DIR']).mkdir(parents=True, exist_ok=True)\n"
        "(Path(os.environ['GOV_MARKER_DIR']) / 'forged').write_text('ran')\n",
        str(source),
        "exec",
    )
    st = source.stat()
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
    header += (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
    header += (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    cache = Path(importlib.util.cache_from_source(str(source)))
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(header + marshal.dumps(forged))
    shutil.rmtree(home / "markers")
    # Python's own importer runs the forged cache instead of the source...
    subprocess.run(
        [sys.executable, "-c", "import govapp.client_app"],
        cwd=folder,
        env={"GOV_MARKER_DIR": str(tmp_path / "plain"), "PYTHONPATH": str(folder)},
        check=True,
        timeout=60,
    )
    assert (tmp_path / "plain" / "forged").exists()
    # ...the gate's runs the reviewed source (the cache is Python's, inert).
    _ran(_run_gate(site_yaml, fab, home, monkeypatch), home)


def test_a_module_changed_after_the_check_does_not_import(
    site_yaml, fab, tmp_path, monkeypatch
) -> None:
    """Each module is checked again as it is imported: a change between the
    folder's check and the import (or during a long round) does not run."""
    approve(site_yaml, fab)
    home = tmp_path / "flwr"

    def tamper(folder: Path) -> None:
        code = folder / "govapp" / "client_app.py"
        code.write_text(code.read_text().replace("3.0", "4.0"))

    res = _run_gate(site_yaml, fab, home, monkeypatch, before_load=tamper)
    assert isinstance(res["raised"], ImportError)
    assert "not the approved code" in str(res["raised"])
    assert not (home / "markers").exists()
    (reply,) = res["pushed"]  # Flower's error reply, as the gate lets it out
    assert not reply.has_error()
    site = reply.content[wire.SITE]
    assert site[wire.REFUSAL_CODE] == "internal-error"
    assert site[wire.REFUSAL_REASON] == wire.REFUSAL_CODES["internal-error"]


def test_a_run_naming_another_app_is_refused(
    site_yaml, fab, tmp_path, monkeypatch
) -> None:
    """Flower loads from the folder the run names; it must be the one checked."""
    approve(site_yaml, fab)
    home = tmp_path / "flwr"
    res = _run_gate(site_yaml, fab, home, monkeypatch, fab_id="other/govapp")
    reason = _assert_refused_before_import(res, home, site_yaml)
    assert "names another app or version" in reason


def test_tampered_bundle_is_refused(site_yaml, fab, tmp_path) -> None:
    """Content that does not hash to the declared (approved) hash never runs."""
    from client.governance import check_approved

    digest, _ = approve(site_yaml, fab)
    site = load_site_config(site_yaml)
    with pytest.raises(AppRefused, match="does not match its declared hash"):
        check_approved(site, digest, fab.read_bytes() + b"x")
    check_approved(site, digest, fab.read_bytes())


def test_approval_off_only_when_explicit(site_yaml, fab) -> None:
    from client.governance import check_approved

    content = fab.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    with pytest.raises(AppRefused, match="not in the site's approved apps"):
        check_approved(load_site_config(site_yaml), digest, content)
    doc = yaml.safe_load(site_yaml.read_text())
    doc["governance"] = {"require_approval": False}
    site_yaml.write_text(yaml.safe_dump(doc))
    check_approved(load_site_config(site_yaml), digest, content)


# -- the reply contract ---------------------------------------------------------------
def _train_reply(
    msg: Message, arrays: dict, metrics: dict, site: dict, packed: bool = False
) -> Message:
    record = ArrayRecord(arrays)
    content = RecordDict(
        {
            wire.ARRAYS: packing.pack_arrays(record) if packed else record,
            wire.METRICS: MetricRecord(metrics),
            wire.SITE: ConfigRecord(site),
        }
    )
    return Message(content=content, reply_to=msg)


@pytest.fixture(scope="module")
def model_arrays() -> dict:
    plan = Plan.model_validate(PLAN)
    return {k: Array(v.numpy()) for k, v in build_plan_model(plan).state_dict().items()}


GOOD_METRICS = {wire.NUM_EXAMPLES: 3, wire.TRAIN_LOSS: 0.5, wire.REFUSED: 0}


@pytest.mark.parametrize(
    "change, problem",
    [
        ("none", None),
        ("extra-array", "is not a parameter"),
        ("reshaped", "the model's is"),
        ("retyped", "the model's is"),
        ("extra-metric", "not allowed in a train reply"),
        ("list-metric", "is a list"),
        ("site-key", "site record key"),
        ("path-reason", "path separator"),
        ("case-reason", "case identifier"),
        ("subset", None),
        ("bad-pack", "is not a parameter"),
    ],
)
@pytest.mark.parametrize("packed", [False, True], ids=["named", "packed"])
def test_contract(
    site_yaml, model_arrays, change: str, problem: str | None, packed: bool
) -> None:
    """The contract reads the arrays a reply carries, packed or not."""
    site = load_site_config(site_yaml)
    plan = Plan.model_validate(PLAN)
    arrays, metrics = dict(model_arrays), dict(GOOD_METRICS)
    record = {wire.SITE_NAME: "hospA"}
    first = next(iter(arrays))
    if change == "extra-array":
        arrays["patient.embedding"] = Array(np.zeros(4, np.float32))
    elif change == "reshaped":
        arrays[first] = Array(np.zeros(7, np.float32))
    elif change == "retyped":
        arrays[first] = Array(arrays[first].numpy().astype(np.float64))
    elif change == "extra-metric":
        metrics["dice-case_00012"] = 0.9
    elif change == "list-metric":
        metrics[wire.TRAIN_LOSS] = [0.1, 0.2, 0.3]
    elif change == "site-key":
        record["cases"] = "12"
    elif change == "path-reason":
        record[wire.REFUSAL_REASON] = "cannot read /data/kits/img.nii.gz"
    elif change == "case-reason":
        record[wire.REFUSAL_REASON] = "case_00012 has no kidney"
    elif change == "subset":
        arrays.pop(first)
    msg = request("train", RecordDict({"config": ConfigRecord({})}))
    reply = _train_reply(msg, arrays, metrics, record, packed)
    if change == "bad-pack":  # a buffer that does not unpack travels as is
        bad = packing.pack_arrays(ArrayRecord(arrays))
        bad[packing.PACKED] = Array(np.zeros(3, np.uint8))
        reply.content[wire.ARRAYS] = bad
    sent, decision, why, nbytes = edge.enforce(site, plan, msg, reply)
    if problem is None:
        assert (decision, why) == ("ran", "") and sent is reply
        assert nbytes >= sum(len(a.data) for a in arrays.values())
        return
    assert decision == "blocked" and problem in why
    assert not sent.content.array_records  # nothing of the reply left
    assert dict(sent.content[wire.METRICS]) == {wire.REFUSED: 1, wire.NUM_EXAMPLES: 0}
    assert sent.content[wire.SITE][wire.REFUSAL_REASON] == edge.BLOCKED_REASON


def test_contract_allows_task_and_fingerprint_metrics(site_yaml) -> None:
    site, plan = load_site_config(site_yaml), Plan.model_validate(PLAN)
    ev = request("evaluate", RecordDict({"config": ConfigRecord({})}))
    metrics = {"dice-kidney": 0.8, "dice-tumour": 0.1, wire.EVAL_LOSS: float("nan")}
    metrics.update({wire.NUM_EXAMPLES: 3, wire.NUM_VAL_CASES: 2})
    reply = Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=ev)
    assert edge.enforce(site, plan, ev, reply)[1] == "ran"
    q = request("query", RecordDict({"config": ConfigRecord({})}))
    fp = {
        wire.FP_N_CASES: 4.0,
        wire.FP_SPACING_Q: [1.0] * 9,
        wire.FP_EXTENT: [1.0] * 3,
        wire.FP_HIST: [0.0] * 1024,
        wire.FP_LABEL_ML: [1.0] * 3,
    }
    reply = Message(RecordDict({wire.METRICS: MetricRecord(fp)}), reply_to=q)
    assert edge.enforce(site, plan, q, reply)[1] == "ran"
    fp[wire.FP_HIST] = [0.0] * 5  # a short "histogram" could be per-case values
    reply = Message(RecordDict({wire.METRICS: MetricRecord(fp)}), reply_to=q)
    assert edge.enforce(site, plan, q, reply)[1] == "blocked"


def test_expected_arrays_match_export(model_arrays) -> None:
    spec = expected_arrays(Plan.model_validate(PLAN))
    assert spec == {k: (tuple(a.shape), a.dtype) for k, a in model_arrays.items()}


# -- the audit log --------------------------------------------------------------
APPENDER = """
import sys
from pathlib import Path
from client.audit_log import AuditLog
log = AuditLog(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    log.append(run_id="w" + sys.argv[2], round=i, decision="ran", bytes_sent=i)
"""


def test_concurrent_appends_keep_the_chain(tmp_path: Path) -> None:
    """Four processes (as concurrent ClientApps) append at once."""
    root = str(Path(__file__).resolve().parents[2])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(tmp_path), str(w), "25"],
            env={"PYTHONPATH": root},
        )
        for w in range(4)
    ]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    log = AuditLog(tmp_path)
    check = log.verify()
    assert check.ok and check.entries == 100, check
    assert [e["seq"] for e in log.entries()] == list(range(1, 101))


@pytest.mark.parametrize(
    "damage, first_bad",
    [
        ("edit", 3),
        ("delete", 3),
        ("swap", 2),
        ("torn-tail", 5),
        ("drop-tail", 5),
    ],
)
def test_damaged_log_names_first_bad_entry(
    site_yaml: Path, damage: str, first_bad: int, capsys
) -> None:
    state = load_site_config(site_yaml).state_dir
    log = AuditLog(state)
    for i in range(5):
        log.append(run_id="r", round=i + 1, decision="ran", epsilon_after=0.1 * i)
    assert cli(["site", "audit", str(site_yaml), "--verify"]) == 0
    lines = log.path.read_text().splitlines()
    if damage == "edit":
        e = json.loads(lines[2])
        e["epsilon_after"] = 0.0
        lines[2] = json.dumps(e, sort_keys=True, separators=(",", ":"))
    elif damage == "delete":
        del lines[2]
    elif damage == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif damage == "torn-tail":
        lines[4] = lines[4][:40]
    elif damage == "drop-tail":
        lines = lines[:4]
    log.path.write_text("\n".join(lines) + "\n")
    check = log.verify()
    assert not check.ok and check.first_bad == first_bad, check
    capsys.readouterr()
    assert cli(["site", "audit", str(site_yaml), "--verify"]) == 1
    assert f"entry {first_bad} is bad" in capsys.readouterr().out


def test_audit_table(site_yaml: Path, capsys) -> None:
    AuditLog(load_site_config(site_yaml).state_dir).append(
        run_id="run-1",
        message_type="train",
        round=2,
        decision="refused",
        reason="budget",
        epsilon_before=1.0,
        epsilon_after=1.0,
        bytes_sent=120,
    )
    assert cli(["site", "audit", str(site_yaml)]) == 0
    out = capsys.readouterr().out
    assert "run-1" in out and "refused" in out and "1.000" in out and "budget" in out


# -- the ClientApp: every reply checked and recorded; epsilon as the ledger says
@pytest.mark.slow
def test_train_is_audited_and_agrees_with_ledger(tmp_path: Path, monkeypatch) -> None:
    import client.app as capp

    monkeypatch.delenv(gate.APP_HASH_ENV, raising=False)
    yml = write_site_yaml(tmp_path, "hospB", cases=4)
    site = load_site_config(yml)
    plan = Plan.model_validate(PLAN)
    arrays = ArrayRecord(build_plan_model(plan).state_dict())
    cfg = ConfigRecord(
        {wire.SERVER_ROUND: 1, wire.RUN_ID: "run-eps", wire.TOTAL_ROUNDS: 1}
    )
    msg = request("train", RecordDict({wire.ARRAYS: arrays, wire.CONFIG: cfg}))
    reply = capp.train(msg, context(yml))
    assert reply.content[wire.METRICS][wire.REFUSED] == 0
    arrived, entry = AuditLog(site.state_dir).entries()  # on arrival, then done
    assert (
        arrived["decision"] == "arrived"
        and arrived["message_id"] == entry["message_id"]
    )
    ledger = PrivacyLedger(site.state_dir, site.name)
    assert entry["decision"] == "ran" and entry["run_id"] == "run-eps"
    assert entry["epsilon_before"] == 0.0
    assert entry["epsilon_after"] == pytest.approx(ledger.epsilon(site.privacy.delta))
    assert entry["epsilon_after"] == pytest.approx(
        reply.content[wire.METRICS][wire.EPSILON]
    )
    assert entry["epsilon_after"] > 0 and entry["round"] == 1
    assert entry["app_hash"].startswith("unverified")
    assert entry["bytes_sent"] > sum(len(a.data) for a in arrays.values())
