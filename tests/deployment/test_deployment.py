"""Deployment on 127.0.0.1: real SuperLink and SuperNodes, TLS, node auth, faults.

One coordinator and three hospitals are started once for the module, exactly
as the runbook (docs/deployment.md) starts them; each test submits runs with
`flwr run` and all processes are stopped by PID at the end, even on failure.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from client.audit_log import AuditLog
from client.node import make_node_key
from client.privacy.ledger import PrivacyLedger
from common.config import load_site_config
from server.deploy import write_connection
from sim.superlink import descendants, free_port
from tests.deployment.harness import (
    BIN,
    Deployment,
    metrics,
    run_cli,
    runbook,
    wait_for,
)

pytestmark = pytest.mark.slow

SITES = ["hospital-a", "hospital-b", "hospital-c"]
PLAN = {
    "spacing-mm": "6,6,8",
    "patch-size": "32,32,16",
    "batch-size": 2,
    "local-epochs": 1,
    "dp-target-epsilon": 30.0,
    "min-sites": 2,
    "expected-sites": 3,
    "site-wait-timeout": 120.0,
}


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("deploy"))
    try:
        d.start_superlink()
        bundle, digest = d.publish()  # the consortium publishes the bundle
        for i, name in enumerate(SITES):
            d.add_site(name, cases=5, seed=i, approval=True)
            d.approve(name, bundle, digest)  # each hospital approves its hash
            res = d.register(name)
            assert res.returncode == 0, res.stdout + res.stderr
        for name in SITES:
            d.start_site(name)
        d.wait_online(SITES)
        yield d
    finally:
        d.stop_all()


def test_tls_only_plaintext_refused(dep):
    url = f"{dep.address}/health"
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{url}", timeout=5)  # plaintext HTTP
    ctx = ssl.create_default_context(cafile=str(dep.certs / "ca.crt"))
    with urllib.request.urlopen(f"https://{url}", timeout=5, context=ctx) as resp:
        assert resp.status == 200  # the consortium CA verifies the SuperLink
    bad = ssl.create_default_context()  # system CAs only: must not verify
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://{url}", timeout=5, context=bad)


def _signed_as(key_path):
    """Headers a SuperNode signs with its private key (Flower's own signer)."""
    from base64 import b64encode

    from cryptography.hazmat.primitives import serialization
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import (
        FLEET_HTTP_PUBLIC_KEY_HEADER,
        FLEET_HTTP_SIGNATURE_HEADER,
    )
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import (
        public_key_to_bytes,
        sign_message,
    )

    key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    stamp = now().isoformat()
    return {
        FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(
            public_key_to_bytes(key.public_key())
        ).decode(),
        TIMESTAMP_HEADER: stamp,
        FLEET_HTTP_SIGNATURE_HEADER: b64encode(
            sign_message(key, stamp.encode("ascii"))
        ).decode(),
    }


def test_hospital_node_cannot_reach_control_api(dep, tmp_path):
    """A registered hospital, with its valid key and the consortium's CA, calls
    every Control and Runtime path on the port it connects to: each is refused
    before Flower sees it, while the operators' address serves them."""
    import httpx

    key = dep.root / "keys" / "hospital-a"
    ca = str(dep.certs / "ca.crt")
    # Every route the installed Flower serves, from its own OpenAPI document.
    spec = httpx.get(
        f"https://{dep.operator_address}/openapi.json",
        verify=ssl.create_default_context(cafile=ca),
        timeout=10,
    ).json()
    paths = [p for p in spec["paths"] if not p.startswith("/v1/fleet/")]
    paths = [p for p in paths if p != "/health"]
    assert len(paths) > 20 and "/v1/control/register-node" in paths
    assert any(p.startswith("/v1/runtime/") for p in paths)
    paths += ["/v1/fleet/../control/list-nodes", "/v1/fleet/%2e%2e/control/stop-run"]
    with httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=10) as http:
        for path in paths:
            res = http.post(f"https://{dep.address}{path}", headers=_signed_as(key))
            assert res.status_code == 403, (path, res.status_code)
            assert "Fleet API only" in res.text
        # The same signed headers do reach Flower on a Fleet path.
        res = http.post(
            f"https://{dep.address}/v1/fleet/get-run", headers=_signed_as(key)
        )
        assert res.status_code != 403
        # The operators' door serves the Control API (to whoever reaches it).
        res = http.post(
            f"https://{dep.operator_address}/v1/control/list-nodes",
            headers={"content-type": "application/protobuf"},
        )
        assert res.status_code == 200
    # The flwr CLI, pointed at the hospitals' port, cannot administer either.
    home = tmp_path / "hospital-flwr"
    write_connection(home, "sneaky", dep.address, dep.certs / "ca.crt")
    res = run_cli(
        [str(BIN / "flwr"), "supernode", "list", "sneaky", "--format", "json"],
        {**dep.env, "FLWR_HOME": str(home)},
    )
    answer = json.loads(res.stdout)
    assert answer["success"] is False, res.stdout
    assert "Fleet API only" in answer["error-message"]  # says where to go
    assert set(dep.online()) == set(SITES)  # nothing changed


def test_unregistered_node_is_refused(dep, tmp_path):
    key = tmp_path / "intruder"
    make_node_key(key)
    log = tmp_path / "intruder.log"
    cmd = [
        str(BIN / "flower-supernode"),
        "--superlink",
        dep.address,
        "--root-certificates",
        str(dep.certs / "ca.crt"),
        "--auth-supernode-private-key",
        str(key),
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dep.env,
            start_new_session=True,
        )
    try:
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code != 0
    assert "Failed to activate SuperNode" in log.read_text()
    # ... and the coordinator's own log records the refused activation.
    assert 'activate-node HTTP/1.1" 412' in dep.procs["superlink"].text()
    assert set(dep.online()) == set(SITES)  # nothing new joined


def test_runbook_status_and_site_check(dep):
    res = dep.step("status")
    assert res.returncode == 0, res.stderr
    for node_id in dep.node_ids.values():
        assert node_id in res.stdout
    res = dep.step("check", SITE_YAML=str(dep.sites["hospital-a"]))
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(
        [
            str(BIN / "kidneyfl"),
            "site",
            "check",
            str(dep.sites["hospital-a"]),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=dep.env,
        check=False,
    )
    doc = json.loads(res.stdout)
    env = doc["environment"]
    assert env["superlink_reachable"] and env["tls_verified"]
    assert env["supernode_command"] == "ok"
    # The sites run only the approved bundle (the runbook's publish and approve).
    assert env["require_approval"] is True and doc["ok"]
    assert "approval-off" not in {f["kind"] for f in doc["findings"]}


def test_every_runbook_block_is_exercised():
    used = {"certs", "superlink", "connect", "register", "status", "run", "resume"}
    used |= {"report", "keygen", "check", "supernode", "publish", "approve"}
    assert set(runbook()) == used


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_site_killed_mid_round_then_coordinator_crash_and_resume(dep):
    """The runbook's run end to end over TLS with node authentication, through
    a site's crash, its restart, the coordinator's crash and the resume; sites
    are known by their registered names throughout."""
    out = dep.root / "runs"
    run_dir = out / "faults"
    plan = {**PLAN, "num-server-rounds": 3, "round-timeout": 120.0}
    run = dep.submit("faults", out, plan)

    # Hospital C's SuperNode crashes once C's train request has arrived (its
    # audit log records a request when it arrives, before any work).
    c_site = load_site_config(dep.sites["hospital-c"])
    c_audit = AuditLog(c_site.state_dir)
    wait_for(
        lambda: any(
            e["message_type"] == "train" and e["decision"] == "arrived"
            for e in c_audit.entries()
        ),
        300,
        "C's train request",
    )
    c_start = dep.procs["site-hospital-c"]
    tree = descendants(c_start.popen.pid)
    (node,) = [p for p in tree if "flower-supernode" in _cmdline(p)]
    os.kill(node, signal.SIGKILL)
    # `kidneyfl site start` says so in one line, stops the rest, exits 3.
    assert c_start.popen.wait(60) == 3
    assert "SuperNode was killed by SIGKILL" in c_start.text()
    assert not [p for p in tree if _alive(p)], "an orphan survived"
    wait_for(lambda: len(metrics(run_dir)) >= 1, 400, "round 1 to complete")
    first = metrics(run_dir)[0]
    assert set(first["train"]) == {"hospital-a", "hospital-b"}
    assert "hospital-c" in first["failed"] and first["aggregated"]

    # C comes back (same key, so the same registered node).
    dep.start_site("hospital-c")

    # The coordinator crashes (SIGKILL of the SuperLink and all it started)
    # once round 2 is checkpointed.
    wait_for(lambda: len(metrics(run_dir)) >= 2, 400, "round 2 to complete")
    dep.procs["superlink"].kill_tree()
    run.stop()
    ckpt = run_dir / "checkpoints"
    latest = json.loads((ckpt / "latest.json").read_text())
    assert latest["round"] == 2
    assert not list(ckpt.glob(".*"))  # no half-written temp file left
    saved_sha = latest["entry"]["global_sha256"]
    before = (run_dir / "metrics.jsonl").read_text()

    # Restart the coordinator on the same database; the hospitals reconnect
    # with their registered identities, and the run resumes at round 3. Sites
    # may have trained round 3 before the crash: under the same schedule they
    # would refuse to train it again (its steps are spent), so the consortium
    # resumes with one more round (docs/deployment.md, step 7): a new schedule,
    # calibrated afresh at each site.
    dep.start_superlink()
    dep.wait_online(SITES, timeout=180)
    again = dep.submit("faults", out, {**plan, "num-server-rounds": 4}, resume=True)
    wait_for(lambda: again.popen.poll() is not None, 600, "resumed run to finish", 1)
    assert again.popen.returncode == 0, again.text()[-3000:]
    log = again.text()
    assert f"resumed faults from round 2 (global weights sha256 {saved_sha})" in log
    rounds = metrics(run_dir)
    assert [e["round"] for e in rounds] == [1, 2, 3, 4]
    assert (run_dir / "metrics.jsonl").read_text().startswith(before)
    # registered names, not node ids (C may still be reconnecting in round 2)
    assert {"hospital-a", "hospital-b"} <= set(rounds[1]["train"]) <= set(SITES)
    for e in rounds[2:]:  # C rejoined after its restart
        assert set(e["train"]) == set(e["evaluate"]) == set(SITES), e
        assert not e["failed"] and not e["refused"] and e["aggregated"]
    assert json.loads((ckpt / "latest.json").read_text())["round"] == 4
    assert (run_dir / "final" / "latest.json").exists()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    # Spent, not used: if C spent on round 1 before its crash, it was told.
    c_ledger = PrivacyLedger(c_site.state_dir, c_site.name)
    spent_1 = [e.run_id for e in c_ledger.entries if e.round == 1]
    for run_id in spent_1:
        assert 1 in c_ledger.unused.get(run_id, []), c_ledger.unused
    a_site = load_site_config(dep.sites["hospital-a"])
    assert not PrivacyLedger(a_site.state_dir, a_site.name).unused  # all used
    res = dep.step("report", RUN_DIR=str(run_dir))
    assert res.returncode == 0 and "hospital-c" in res.stdout, res.stderr
    # A deployed run keeps its ServerApp log and run config, as a simulation does.
    served = (run_dir / "logs" / "serverapp.log").read_text()
    assert "resumed faults from round 2" in served and "round 1" in served
    config = tomllib.loads((run_dir / "run-config.toml").read_text())
    assert config["num-server-rounds"] == 3 and config["run-name"] == "faults"
    # (the first submission's config: a resume keeps it beside the results)


def test_run_stops_cleanly_when_sites_are_gone(dep):
    out = dep.root / "runs"
    for name in ("hospital-b", "hospital-c"):
        dep.procs[f"site-{name}"].stop()  # graceful: the node goes offline now
    wait_for(
        lambda: sum(s == "online" for s in dep.online().values()) == 1,
        120,
        "two sites offline",
    )
    start = time.monotonic()
    run = dep.submit(
        "gone", out, {**PLAN, "num-server-rounds": 2, "site-wait-timeout": 10.0}
    )
    wait_for(lambda: run.popen.poll() is not None, 300, "flwr run to end", 1)
    assert time.monotonic() - start < 240  # did not wait forever
    status = json.loads((out / "gone" / "status.json").read_text())
    assert status["state"] == "stopped" and status["rounds_done"] == 0
    assert "1 site(s) connected within 10 s, 2 needed" in status["message"]
    assert "1 site(s) connected within 10 s" in run.text()
    res = run_cli([str(BIN / "flwr"), "list", "consortium"], dep.env)
    assert res.returncode == 0
