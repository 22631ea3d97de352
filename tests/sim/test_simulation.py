"""End to end: a real Flower simulation of two phantom hospitals (slow)."""

import io
import json

import pytest

from cli.pretrain import pretrain
from client.cli import privacy_report
from client.timings import read_timings
from common.config import load_site_config
from common.ood import FEATURES, THRESHOLDS
from common.postprocess import CANDIDATES
from server.checkpoint import load_checkpoint
from server.reporting.clinical import clinical_lines
from server.reporting.metrics_log import summary_table
from sim.runner import simulate
from tests.fakes import TINY_PLAN, write_site_yaml

PLAN = {
    **TINY_PLAN,
    "local-epochs": 2,
    "learning-rate": 0.01,
    "dp-target-epsilon": 20.0,
    "min-sites": 2,
    "fingerprint-round": True,  # spacing and HU window derived from all sites
    "fingerprint-min-cases": 5,
}


@pytest.mark.slow
def test_federation_with_dp_refusal_checkpoints_and_resume(tmp_path):
    sites = [
        write_site_yaml(tmp_path, n, cases=6, seed=i, profile=p)
        for i, (n, p) in enumerate(
            [("site-a", "thin-slice-cm"), ("site-b", "thick-slice-noisy")]
        )
    ]
    # A third hospital allows less than the plan asks: it refuses every round,
    # and the federation goes on without it.
    sites.append(
        write_site_yaml(
            tmp_path,
            "site-c",
            cases=4,
            seed=7,
            privacy={"enabled": True, "max_epsilon": 5.0, "delta": 1e-3},
        )
    )
    # The federation starts from a model pretrained on "public" data (issue 19).
    public = write_site_yaml(
        tmp_path, "public", cases=4, seed=9, privacy={"enabled": False}
    )
    pre = pretrain(
        public,
        tmp_path / "pre",
        dataset="public phantoms",
        licence="CC0",
        steps=2,
        overrides={k: PLAN[k] for k in ("spacing-mm", "patch-size", "batch-size")},
    )
    plan = {**PLAN, "initial-checkpoint": str(pre)}
    kw = dict(out_dir=tmp_path / "runs", flwr_home=tmp_path / "flwr-home", stream=True)
    term = io.StringIO()
    run = simulate(
        sites, "e2e", overrides={**plan, "num-server-rounds": 2}, out=term, **kw
    )

    # The terminal (issue 20): banner, one line per round, no repeats, no
    # dependency warnings; Flower's own log is in the run's logs/ in full.
    shown = term.getvalue().splitlines()
    assert shown[0] == "kidneyfl run e2e" and "target epsilon 20" in shown[3]
    # the pretrained start is evaluated at every site first (round 0)
    assert [x[:9] for x in shown[6:]] == ["start    ", "round   1", "round   2"]
    assert "site-c REFUSED" in shown[7]
    assert len(shown) == len(set(shown)) and "Warning" not in term.getvalue()
    flower_log = (run / "logs" / "flwr.log").read_text()
    assert "[ROUND 2/2]" in flower_log and "Orientationd" not in flower_log
    assert (run / "logs" / "superlink.log").is_file()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["rounds_done"] == 2
    page = (run / "report.html").read_text()
    assert "finished: round 2 of 2" in page and 'http-equiv="refresh"' not in page

    prep = json.loads((run / "preprocessing.json").read_text())
    assert prep["sites"] == ["site-a", "site-b"] and prep["cases"] == 12
    assert "fewer usable patients" in prep["refused"]["site-c"]  # 4 cases < 5
    assert -100 < prep["hu-window"][0] < prep["hu-window"][1] < 600  # kidney HU
    assert all(p % 16 == 0 for p in prep["patch-size"])
    assert all(p <= c for p, c in zip(prep["patch-size"], [32, 32, 16], strict=True))
    assert prep["foreground-std"] > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["round"] for e in lines] == [1, 2]
    for e in lines:
        assert set(e["train"]) == {"site-a", "site-b"}
        assert set(e["evaluate"]) == {"site-a", "site-b", "site-c"}
        assert set(e["refused"]) == {"site-c"}
        assert "epsilon 20" in e["refused"]["site-c"]
        assert "at most 5" in e["refused"]["site-c"]
        assert not e["rejected"] and not e["failed"] and e["aggregated"]
    # DP sites send no training loss (docs/privacy.md); validation loss falls.
    assert not any("train-loss" in m for e in lines for m in e["train"].values())
    assert lines[1]["weighted"]["eval-loss"] < lines[0]["weighted"]["eval-loss"]
    eps = [e["epsilon"]["site-a"] for e in lines]
    assert 0 < eps[0] < eps[1] <= 20.0 * 1.01  # cumulative, within the plan target
    side = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert side["round"] == 2 and side["max_epsilon_spent"] == pytest.approx(
        max(e for e in lines[-1]["epsilon"].values())
    )
    assert (run / "checkpoints" / "round-0001.pt").exists()
    assert (run / "final" / "latest.json").exists()
    # What the consortium gets back (issue 6): report, exported model, events.
    assert 'id="curves"' in (run / "report.html").read_text()
    assert (run / "final" / "model.torchscript.pt").exists()
    assert any((run / "tensorboard").iterdir())
    side = json.loads((run / "final" / "latest.json").read_text())
    assert side["preprocessing"]["spacing-mm"] == prep["spacing-mm"]
    assert side["initial_checkpoint"]["dataset"] == "public phantoms"
    assert side["initial_checkpoint"]["sha256"] == load_checkpoint(pre)[1]["sha256"]
    assert "epsilon spent" in privacy_report(str(sites[0]))
    # What a clinician needs of the final model (issue 28): the federation's
    # post-processing, the OOD threshold and the provenance, in its sidecar.
    clinical = json.loads((run / "clinical.json").read_text())
    assert clinical["training-data"] == {
        "synthetic-only": True,
        "sites": dict.fromkeys(("site-a", "site-b", "site-c"), "synthetic"),
        "pretrained-on": "synthetic",
    }
    assert set(clinical["candidates"]) == set(CANDIDATES)  # every rule, every site
    assert clinical["postprocess"]["rule"] in CANDIDATES
    ood = clinical["ood-reference"]
    assert len(ood["mean"]) == len(ood["std"]) == len(FEATURES)
    assert ood["threshold"] in THRESHOLDS and ood["calibrated-on"] >= 3
    final = json.loads((run / "final" / "latest.json").read_text())
    for key in ("postprocess", "ood-reference", "training-data"):
        assert final[key] == clinical[key]
    assert any("Post-processing chosen" in x for x in clinical_lines(run, lines))
    assert 'id="postprocessing"' in (run / "report.html").read_text()
    # Each site keeps its own timings (load and work per message), locally.
    state = load_site_config(sites[0]).state_dir
    kinds = [(t["round"], t["kind"]) for t in read_timings(state)]
    assert kinds == [
        (0, "evaluate"),  # the pretrained start, before any training
        (1, "train"),
        (1, "evaluate"),
        (2, "train"),
        (2, "evaluate"),
        (2, "evaluate"),  # the clinical calibration's two requests
        (2, "evaluate"),
    ]
    start = json.loads((run / "start-evaluation.json").read_text())
    assert start["round"] == 0 and not start["train"] and not start["epsilon"]
    assert set(start["evaluate"]) == {"site-a", "site-b", "site-c"}
    assert 0 <= start["weighted"]["dice-kidney"] <= 1
    assert "(the starting model in brackets)" in summary_table(lines, start)
    assert all(t["work_s"] > 0 and t["load_s"] >= 0 for t in read_timings(state))

    # Resume: one more round continues from the checkpoint, nothing is lost.
    simulate(
        sites, "e2e", overrides={**plan, "num-server-rounds": 3, "resume": True}, **kw
    )
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["round"] for e in lines] == [1, 2, 3]
    # a resumed run does not evaluate its start again
    assert json.loads((run / "start-evaluation.json").read_text()) == start
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["round"] == 3
