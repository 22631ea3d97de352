"""Privacy audits: the one-run bound, membership inference, and a DP canary.

The white-box tests are the guard the project relies on: with DP on, the audit's
lower bound stays below the accountant's epsilon; with the noise switched off
behind the accountant's back, the same audit proves a larger epsilon. A
correct mechanism exceeds its epsilon in the first test with probability at
most 5 % by construction (in practice far less: the one-run audit is loose).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from cli.main import main as kidneyfl
from client.privacy.canaries import calibrated_linear_audit, inclusion_coins
from client.privacy.membership import membership_attacks
from client.tasks.segmentation.task import SegmentationTask
from common.artifacts import effective_preprocessing
from common.audit_bounds import (
    clopper_pearson,
    guess_and_bound,
    one_run_epsilon_lower_bound,
    operating_point,
    p_value_dp_audit,
)
from common.config import Plan, load_site_config
from common.task_models import build_plan_model
from common.weights import export_state
from server.checkpoint import save_checkpoint
from tests.fakes import write_site_yaml


# -- the one-run bound (Steinke, Nasr, Jagielski 2023) --------------------------
def test_all_correct_guesses_bound_matches_the_closed_form():
    # delta = 0, v = r: P[Bin(r, q) >= r] = q^r < 0.05  <=>  q < 0.05^(1/r)
    q = 0.05 ** (1 / 200)
    closed = math.log(q / (1 - q))  # 4.19
    assert one_run_epsilon_lower_bound(1000, 200, 200, 0.0) == pytest.approx(
        closed, abs=1e-6
    )
    # a delta of 1e-5 weakens it a little, never strengthens it
    with_delta = one_run_epsilon_lower_bound(1000, 200, 200, 1e-5)
    assert 3.5 < with_delta < closed


def test_chance_level_guesses_prove_nothing_and_more_correct_proves_more():
    assert one_run_epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    bounds = [one_run_epsilon_lower_bound(1000, 200, v, 1e-5) for v in (130, 160, 190)]
    assert 0 < bounds[0] < bounds[1] < bounds[2]


def test_p_value_is_the_binomial_tail_without_delta():
    for eps in (0.5, 2.0):
        q = math.exp(eps) / (1 + math.exp(eps))
        assert p_value_dp_audit(500, 100, 70, eps, 0.0) == pytest.approx(
            stats.binom.sf(69, 100, q)
        )
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value_dp_audit(10, 20, 5, 1.0, 0.0)


def test_top_and_bottom_guesses_are_counted():
    scores = np.arange(10.0)
    included = np.array([0, 0, 1, 0, 0, 1, 1, 0, 1, 1], dtype=bool)
    g = guess_and_bound(scores, included, k_pos=3, k_neg=3, delta=0.0)
    # top 3 (scores 7, 8, 9): two in; bottom 3 (0, 1, 2): two out
    assert g.correct == 4 and g.k_pos + g.k_neg == 6


def test_inclusion_coins_are_fair():
    coins = inclusion_coins(4000)
    assert 1800 < coins.sum() < 2200  # 6 sigma


# -- membership inference statistics ----------------------------------------------
def test_clopper_pearson_bound_of_a_perfect_attack():
    # 100 members all above the threshold, no non-member: the bound is
    # log(TPR_lo / FPR_hi) with the exact one-sided limits (alpha 0.05 two-sided).
    op = operating_point(np.arange(100) + 1000.0, np.arange(100.0), 0.001, 0.0)
    assert (op.tp, op.fp) == (100, 0)
    tpr_lo, fpr_hi = 0.025 ** (1 / 100), 1 - 0.025 ** (1 / 100)
    assert op.tpr_ci[0] == pytest.approx(tpr_lo)
    assert op.fpr_ci[1] == pytest.approx(fpr_hi)
    assert op.epsilon_lb == pytest.approx(math.log(tpr_lo / fpr_hi))
    lo, hi = clopper_pearson(50, 100, 0.05)
    assert lo < 0.5 < hi


def test_calibration_finds_members_that_plain_loss_misses():
    # Patients differ a lot in difficulty; training lowers members' loss a little.
    rng = np.random.default_rng(0)
    ref_in, ref_out = rng.uniform(0, 10, 200), rng.uniform(0, 10, 200)
    loss_in, loss_out = ref_in - 0.5, ref_out.copy()
    out = membership_attacks(loss_in, loss_out, ref_in, ref_out, delta=1e-3)
    assert out["loss-threshold"]["auc"] < 0.65
    assert out["calibrated"]["auc"] == 1.0
    assert out["calibrated"]["epsilon_lb"] > 2.0
    same = membership_attacks(ref_in, ref_in, ref_in, ref_in, delta=1e-3)
    assert same["loss-threshold"]["auc"] == 0.5
    assert same["loss-threshold"]["epsilon_lb"] == 0.0


# -- white-box canaries through the site's DP wiring --------------------------------
TARGET_EPSILON = 2.0


def _audit(break_noise: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG and hook warnings
        return calibrated_linear_audit(
            TARGET_EPSILON, canaries=1000, break_noise=break_noise
        )


def test_dp_sgd_audit_stays_below_the_accountants_epsilon():
    res = _audit(break_noise=False)
    assert res.accountant_epsilon == pytest.approx(TARGET_EPSILON, abs=0.05)
    assert res.noise_multiplier > 0
    assert res.epsilon_lb <= res.accountant_epsilon


def test_dp_sgd_audit_catches_a_mechanism_without_noise():
    res = _audit(break_noise=True)
    assert res.noise_multiplier == 0.0 and res.accountant_noise > 0
    assert res.epsilon_lb > res.accountant_epsilon


# -- the site command ---------------------------------------------------------------
def test_site_audit_privacy_writes_a_local_report(tmp_path, capsys):
    site_yaml = write_site_yaml(tmp_path, "audit", cases=6, privacy={"enabled": False})
    site = load_site_config(site_yaml)
    plan = Plan.model_validate(
        {
            "model": "unet-tiny",
            "spacing-mm": "8,8,10",
            "patch-size": "32,32,16",
            "batch-size": 4,
        }
    )
    task = SegmentationTask()
    data = task.load_data(site, plan)
    model = build_plan_model(plan)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loss_fn = task.loss(plan)
    loader = torch.utils.data.DataLoader(data.train, batch_size=4, shuffle=True)
    for x, y in loader:  # one epoch: the report's shape, not its numbers, is tested
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    sidecar = {
        "plan": plan.model_dump(by_alias=True, mode="json"),
        "model": plan.model,
        "preprocessing": effective_preprocessing(plan, None),
    }
    save_checkpoint(tmp_path / "run" / "final", 1, export_state(model), sidecar)
    out = tmp_path / "audit.json"
    argv = ["site", "audit-privacy", str(site_yaml), "--checkpoint"]
    assert kidneyfl([*argv, str(tmp_path / "run" / "final"), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "loss-threshold" in table and "calibrated" in table
    assert "not a proof of privacy" in table
    report = json.loads(out.read_text())
    assert (report["members"], report["non_members"]) == (data.n_train, data.n_val)
    for attack in report["attacks"].values():
        assert 0.0 <= attack["auc"] <= 1.0 and attack["epsilon_lb"] >= 0.0
    # without --out the report goes to the site's own state directory
    assert kidneyfl([*argv, str(tmp_path / "run" / "final")]) == 0
    assert len(list((site.state_dir / "privacy-audit").glob("run-*.json"))) == 1


# -- black-box canary patients for `kidneyfl simulate --audit-canaries N` ------------
def test_canary_patients_join_training_only_when_their_coin_says_so(tmp_path):
    from client.tasks.segmentation.cases import load_site_cases
    from server.reporting.metrics_log import read_metrics
    from sim.canary_cases import prepare_canary_sites
    from sim.cli import audit_finish

    original = write_site_yaml(tmp_path, "canary-site", cases=6)
    before = load_site_cases(load_site_config(original))
    run_dir = tmp_path / "run"
    [audited] = prepare_canary_sites([original], 8, run_dir)
    secret = json.loads((run_dir / "privacy-audit" / "canaries.json").read_text())
    after = load_site_cases(load_site_config(audited))
    pairs = zip(secret["canaries"], secret["included"], strict=True)
    chosen = {c for c, keep in pairs if keep}
    train_ids = {c.case_id for c in after.train}
    # the site's own split is kept; exactly the included canaries are added
    assert train_ids == {c.case_id for c in before.train} | chosen
    assert [c.case_id for c in after.validation] == [
        c.case_id for c in before.validation
    ]
    # the audit keeps its own ledger, away from the real site's
    assert load_site_config(audited).state_dir != load_site_config(original).state_dir
    plan = Plan.model_validate(
        {"model": "unet-tiny", "spacing-mm": "8,8,10", "patch-size": "32,32,16"}
    )
    sidecar = {
        "plan": plan.model_dump(by_alias=True, mode="json"),
        "model": plan.model,
        "preprocessing": effective_preprocessing(plan, None),
    }
    save_checkpoint(run_dir / "final", 1, export_state(build_plan_model(plan)), sidecar)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    line = audit_finish(run_dir)  # what `kidneyfl simulate --audit-canaries` runs
    result = json.loads((run_dir / "privacy-audit.json").read_text())
    assert result["canaries"] == 8 and result["included"] == len(chosen)
    assert 0 <= result["correct"] <= result["guesses"] and result["epsilon_lb"] >= 0
    assert "privacy-audit.json" in line
    # the run's record has it after the rounds; readers of rounds skip it
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["privacy_audit"]["canaries"] == 8
    assert read_metrics(run_dir) == [{"round": 1}]


def test_site_audit_privacy_names_a_missing_checkpoint(tmp_path, capsys):
    site_yaml = write_site_yaml(tmp_path, "nockpt", cases=4, generate=False)
    missing = tmp_path / "runs" / "nope" / "final"
    argv = ["site", "audit-privacy", str(site_yaml), "--checkpoint", str(missing)]
    assert kidneyfl(argv) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "runs/<run>/final" in err


def test_classification_loss_is_one_number_per_patient():
    from client.privacy.membership import PER_CASE_LOSS
    from client.tasks.classification.data import SliceDataset

    images = torch.zeros((3, 1, 4, 4))
    labels = torch.tensor([0, 1, 1])
    data = SliceDataset(images, labels, patients=[[0, 1], [2]])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    torch.nn.init.zeros_(model[1].weight)
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([math.log(3.0), 0.0]))  # p = (3/4, 1/4)
    losses = PER_CASE_LOSS["classification"](model, data, None, torch.device("cpu"))
    # patient 1: mean of -log 3/4 and -log 1/4; patient 2: -log 1/4
    expected = [(-math.log(0.75) - math.log(0.25)) / 2, -math.log(0.25)]
    assert losses == pytest.approx(expected)


def test_report_shows_the_canary_audit_when_one_ran(tmp_path):
    from server.reporting.html import write_report
    from tests.fakes import write_run

    run = write_run(tmp_path)
    assert 'id="privacy-audit"' not in write_report(run).read_text()
    audit = {"mode": "black-box", "site": "hospital-a", "canaries": 32}
    audit |= {"correct": 9, "guesses": 16, "epsilon_lb": 0.4321}
    audit |= {"accountant_epsilon": 7.95}
    (run / "privacy-audit.json").write_text(json.dumps(audit))
    page = write_report(run).read_text()
    assert 'id="privacy-audit"' in page and "0.4321" in page and "7.95" in page
