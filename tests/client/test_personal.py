"""FedProx's proximal term (with and without DP-SGD) and FedBN at the site."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn
from torch.utils.data import TensorDataset

from client.local_state import keep_norm_local, overlay_local_norm, personal_dir
from client.privacy.dpsgd import DPSpec
from client.train import local_train
from common.config import load_site_config
from common.models import build_model
from common.norm_layers import norm_keys, require_norm_params
from tests.fakes import FiveNodeGrid, train_reply, wrap_strategy, write_site_yaml

pytestmark = pytest.mark.usefixtures("task_identity")

LR, MU = 0.1, 0.5


def _data(n=6):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g))


def _step(mu, anchor, dp=None, seed=0):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    local_train(
        model,
        _data(),
        nn.MSELoss(),
        epochs=1,
        batch_size=6,  # one full-batch step (one Poisson step under DP)
        learning_rate=LR,
        optimizer="sgd",
        device=torch.device("cpu"),
        seed=seed,
        dp=dp,
        proximal_mu=mu,
        anchor=anchor,
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _anchor():
    return {"weight": torch.full((2, 4), 0.3), "bias": torch.full((2,), -0.2)}


def test_proximal_term_is_the_gradient_of_mu_half_squared_distance():
    got = _step(MU, _anchor())
    torch.manual_seed(0)
    ref = nn.Linear(4, 2)
    x, y = _data().tensors
    loss = nn.MSELoss()(ref(x), y)
    loss = loss + MU / 2 * sum(
        ((p - _anchor()[n]) ** 2).sum() for n, p in ref.named_parameters()
    )
    loss.backward()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            assert torch.allclose(got[name], p - LR * p.grad, atol=1e-6), name
    # and it is a real term: without it the step differs
    assert not torch.allclose(_step(0.0, _anchor())["weight"], got["weight"])


def test_proximal_term_under_dp_is_added_after_clipping_and_noise():
    # A tight clipping norm: if the term went through Opacus' per-sample
    # clipping, the difference below would not be exactly mu * (w - a). The
    # noise is set to zero (and q = 1, the batch is every case) so that the two
    # runs differ only by the term: DP noise is never reproducible across runs.
    dp = DPSpec(noise_multiplier=0.0, max_grad_norm=0.01, grad_sample_mode="hooks")
    with_prox = _step(MU, _anchor(), dp=dp, seed=5)
    without = _step(0.0, _anchor(), dp=dp, seed=5)
    torch.manual_seed(0)
    w0 = nn.Linear(4, 2).state_dict()
    for name in w0:
        expected = -LR * MU * (w0[name] - _anchor()[name])
        assert torch.allclose(with_prox[name] - without[name], expected, atol=1e-6)
    # with real noise the term is still added, on top of the privatised step:
    # the difference from the expected shift is noise of the DP scale
    # (sigma C / batch per coordinate, batch 6), not the term clipped away
    noisy = DPSpec(noise_multiplier=1.0, max_grad_norm=0.01, grad_sample_mode="hooks")
    shift = torch.cat(
        [
            (_step(MU, _anchor(), dp=noisy)[k] - without[k]).flatten()
            - (-LR * MU * (w0[k] - _anchor()[k])).flatten()
            for k in w0
        ]
    )
    assert shift.abs().max() < 6 * LR * 1.0 * 0.01 / 6 * 3


def test_fedbn_needs_affine_norm():
    assert norm_keys(build_model("unet-tiny")) == []
    keys = require_norm_params(build_model("unet-tiny-affine"), "unet-tiny-affine")
    assert keys and all(k.endswith(("weight", "bias")) for k in keys)
    try:
        require_norm_params(build_model("unet-tiny"), "unet-tiny")
    except ValueError as exc:
        assert "unet-tiny-affine" in str(exc) and "fedbn" in str(exc)
    else:
        raise AssertionError("a model without norm parameters passed")


def test_fedbn_keeps_norm_params_at_the_site(tmp_path):
    site = load_site_config(write_site_yaml(tmp_path, "a", generate=False))
    model = build_model("unet-tiny-affine")
    keys = norm_keys(model)
    received = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {k: v + 0.5 for k, v in received.items()}  # every weight moved

    sent = keep_norm_local(trained, received, keys, site, "run-1")
    for k in received:
        expected = received[k] if k in keys else trained[k]
        assert torch.equal(sent[k], expected), k
    assert (personal_dir(site, "run-1") / "norm.pt").exists()

    # next round: the site starts from the new global weights and its own norm
    new_global = {k: v - 1.0 for k, v in received.items()}
    start = overlay_local_norm(new_global, site, "run-1")
    for k in received:
        expected = trained[k] if k in keys else new_global[k]
        assert torch.equal(start[k], expected), k
    # another run starts from the global norm layers
    assert torch.equal(
        overlay_local_norm(new_global, site, "run-2")[keys[0]], new_global[keys[0]]
    )

    # aggregated with another site's reply, the global norm layers do not move
    s = wrap_strategy()
    glob = ArrayRecord(received)
    list(s.configure_train(1, glob, ConfigRecord(), FiveNodeGrid()))
    other = keep_norm_local(
        {k: v - 0.25 for k, v in received.items()}, received, keys, site, "run-1"
    )
    out, _ = s.aggregate_train(
        1,
        [
            train_reply(1, "a", ArrayRecord(dict(sent)), 2),
            train_reply(2, "b", ArrayRecord(dict(other)), 2),
        ],
    )
    non_norm = next(k for k in received if k not in keys)
    assert np.allclose(out[keys[0]].numpy(), received[keys[0]].numpy())
    assert not np.allclose(out[non_norm].numpy(), received[non_norm].numpy())


def test_affine_norm_model_trains_under_opacus(tiny_site, tiny_plan):
    from client.tasks.segmentation.task import SegmentationTask

    plan = tiny_plan.model_copy(update={"model": "unet-tiny-affine"})
    task = SegmentationTask()
    data = task.load_data(tiny_site, plan)
    model = build_model("unet-tiny-affine")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data.train.set_seed(0)
    stats = local_train(
        model,
        data.train,
        task.loss(plan),
        epochs=1,
        batch_size=2,
        learning_rate=0.01,
        optimizer="adam",
        device=torch.device("cpu"),
        seed=0,
        dp=DPSpec(1.0, 1.0, "functorch"),
        proximal_mu=0.1,
    )
    assert stats.steps >= 1
    key = norm_keys(model)[0]
    assert not torch.equal(model.state_dict()[key], before[key])
