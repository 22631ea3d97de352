"""Governance on a real deployment: SuperLink (TLS), two SuperNodes with
``--isolation process``, each with the site's gate executor.

Each site runs `python -m client.executor site` (SuperNode plus executor).
One run of the test app (tests/govapp) goes to both sites. hospA approved the
bundle, hospB did not: hospB must answer with an error naming the hash and
never import the bundle (its ClientApp writes a marker when imported); hospA
runs it, and its second reply, which carries a metric off the contract, is
withheld at the gate. Both audit logs verify.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.audit_log import AuditLog
from client.edge import BLOCKED_REASON
from client.governance import approve, bundle_hash
from client.privacy.ledger import PrivacyLedger
from common.config import load_site_config
from sim.runner import PROJECT_DIR
from tests.deployment.harness import (
    BIN,
    CONNECTION,
    Deployment,
    metrics,
    run_cli,
    wait_for,
)

pytestmark = pytest.mark.slow

GOVAPP = Path(__file__).resolve().parents[1] / "govapp"


def build_fab(out: Path, env: dict, app: Path = GOVAPP) -> Path:
    """`flwr build` of ``app``: the bundle a hospital reviews and approves."""
    res = subprocess.run(
        [str(BIN / "flwr"), "build", "--app", str(app)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (fab,) = list(out.glob("*.fab")) or list(app.glob("*.fab"))
    return fab.replace(out / fab.name)


def test_only_the_approved_bundle_runs(tmp_path: Path) -> None:
    d = Deployment(tmp_path / "deploy", tls=True, auth=False)
    out = tmp_path / "replies.json"
    d.env.update(GOV_OUT=str(out), GOV_NODES="2")
    try:
        d.start_superlink()
        fab = build_fab(tmp_path, d.env)
        markers = {}
        for i, name in enumerate(("hospA", "hospB")):
            yml = d.add_site(name, cases=2, seed=i, approval=True)
            if name == "hospA":
                approve(yml, fab)
            markers[name] = tmp_path / f"markers-{name}"
            env = dict(
                d.env, PYTHONPATH=str(PROJECT_DIR), GOV_MARKER_DIR=str(markers[name])
            )
            # What `kidneyfl site start` runs with approval on: the SuperNode
            # (--isolation process) and the gate executor, as one service.
            cmd = [sys.executable, "-m", "client.executor", "site", str(yml)]
            d._start(f"site-{name}", cmd, env)
        res = run_cli(
            [str(BIN / "flwr"), "run", str(GOVAPP), CONNECTION, "--stream"],
            d.env,
            timeout=240,
        )
        wait_for(out.exists, 30, "the ServerApp's replies file")
    finally:
        d.stop_all()
    replies = json.loads(out.read_text())
    digest = bundle_hash(fab)
    by_site = {}
    for phase, rows in replies.items():
        for row in rows:
            name = row.get("site", {}).get("name") or (
                "hospB" if "hospB" in row.get("error", "") else "?"
            )
            by_site[(phase, name)] = row
    assert set(by_site) == {
        ("plain", "hospA"),
        ("plain", "hospB"),
        ("extra", "hospA"),
        ("extra", "hospB"),
    }, (replies, res.stdout[-3000:])
    # hospB: refused before anything from the bundle was imported.
    for phase in ("plain", "extra"):
        reason = by_site[(phase, "hospB")]["error"]
        assert "refuses app bundle sha256:" + digest in reason and "/" not in reason
    assert not markers["hospB"].exists()
    # hospA: the approved bundle ran; its off-contract reply never left.
    assert by_site[("plain", "hospA")]["metrics"] == {"n-cases": 3.0}
    assert any(markers["hospA"].iterdir())
    blocked = by_site[("extra", "hospA")]
    assert blocked["metrics"] == {"refused": 1, "num-examples": 0}
    assert blocked["site"]["refusal-reason"] == BLOCKED_REASON
    # Both sites' records: every request, the chain intact.
    logs = {n: AuditLog(load_site_config(d.sites[n]).state_dir) for n in d.sites}
    a = [(e["decision"], e["where"]) for e in logs["hospA"].entries()]
    b = [(e["decision"], e["app_hash"][:8]) for e in logs["hospB"].entries()]
    assert a == [("ran", "gate"), ("blocked", "gate")]
    assert b == [("refused", digest[:8])] * 2
    assert "case-ids" in logs["hospA"].entries()[1]["reason"]
    assert all(log.verify().ok for log in logs.values())


def test_approved_kidneyfl_bundle_trains_through_the_gate(tmp_path: Path) -> None:
    """The real app, approved by hash, trains one round behind the gate; the
    site's audit log records both requests with the bundle's hash and agrees
    with the privacy ledger."""
    d = Deployment(tmp_path / "deploy", tls=True, auth=False)
    try:
        d.start_superlink()
        fab = build_fab(tmp_path, d.env, d.app)
        yml = d.add_site("hospA", cases=4, seed=0, approval=True)
        approve(yml, fab)
        env = dict(d.env, PYTHONPATH=str(PROJECT_DIR))
        node = d._start(
            "site-hospA",
            [sys.executable, "-m", "client.executor", "site", str(yml)],
            env,
        )
        plan = {
            "spacing-mm": "6,6,8",
            "patch-size": "32,32,16",
            "batch-size": 2,
            "model": "unet-tiny",
            "num-server-rounds": 1,
            "local-epochs": 1,
            "dp-target-epsilon": 30.0,
            "min-sites": 1,
            "expected-sites": 1,
            "site-wait-timeout": 120.0,
        }
        run = d.submit("gov-e2e", tmp_path / "runs", plan)
        wait_for(lambda: run.popen.poll() is not None, 400, "flwr run to finish", 1)
    finally:
        d.stop_all()
    assert run.popen.returncode == 0, run.text()[-3000:]
    # Every message ran in a warm spare (federation.warm_clientapp, the
    # default): train, evaluate and the clinical calibration's two evaluates.
    assert node.text().count("handed to the warm ClientApp") == 4, node.text()[-3000:]
    rounds = metrics(tmp_path / "runs" / "gov-e2e")
    assert len(rounds) == 1 and rounds[0]["aggregated"], rounds
    site = load_site_config(yml)
    log = AuditLog(site.state_dir)
    entries = log.entries()
    assert log.verify().ok
    # Each request is recorded when it arrives, before any work, then its outcome.
    assert [(e["message_type"], e["decision"], e["where"]) for e in entries] == [
        ("train", "arrived", "app"),
        ("train", "ran", "app"),
        ("evaluate", "arrived", "app"),
        ("evaluate", "ran", "app"),
        # the clinical calibration (server/clinical_round.py): through the
        # same gate, contract and audit log as every request
        ("evaluate", "arrived", "app"),
        ("evaluate", "ran", "app"),
        ("evaluate", "arrived", "app"),
        ("evaluate", "ran", "app"),
    ], entries
    clinical = json.loads((tmp_path / "runs" / "gov-e2e" / "clinical.json").read_text())
    assert clinical["training-data"]["sites"] == {"hospA": "synthetic"}
    assert "ood-reference" in clinical  # list metrics passed the site's contract
    assert {e["app_hash"] for e in entries} == {bundle_hash(fab)}
    ledger = PrivacyLedger(site.state_dir, site.name)
    ran = entries[1]
    assert ran["epsilon_after"] == pytest.approx(ledger.epsilon(site.privacy.delta))
    assert ran["epsilon_before"] == 0.0 < ran["epsilon_after"]
    assert entries[0]["epsilon_after"] == 0.0  # nothing spent when it arrived
    # Flower 1.42 ships uv for runtime dependency installation: it stays off at
    # the coordinator and at the site (no per-run environment was made).
    assert not list(tmp_path.rglob("runtime-envs")), "Flower installed packages"
