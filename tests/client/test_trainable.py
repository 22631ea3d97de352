"""``trainable-parameters``: a site trains only some parameters (issue 19).

Fine-tuning a pretrained model under DP: the noise grows with the number of
trained parameters, so a site may train only the biases (DP-BiTFiT) or the
norm layers and biases. The others must stay exactly as the global model has
them, and the clipping norm must be over the trained ones only (else the
frozen part's gradient would eat the clipping budget).
"""

from __future__ import annotations

import pytest
import torch

from client.privacy.dpsgd import DPSpec
from client.train import local_train, trainable_names
from common.models import build_model
from tests.fakes import TINY_PLAN

N_IN, N_OUT = 6, 3


class _Patients(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, N_IN, generator=g) * 3
        self.y = torch.randint(0, N_OUT, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def test_biases_only_clips_and_moves_only_the_biases():
    """Zero noise, q = 1: the step is exact. Each patient's bias gradient is
    clipped on its own norm (not the whole model's), the weights never move."""
    n, clip = 5, 0.05
    data = _Patients(n)
    torch.manual_seed(0)
    model = torch.nn.Linear(N_IN, N_OUT)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    local_train(
        model, data, torch.nn.CrossEntropyLoss(), epochs=1, batch_size=n,
        learning_rate=1.0, optimizer="sgd", device=torch.device("cpu"), seed=0,
        dp=DPSpec(0.0, clip, "hooks"), trainable="biases",
    )  # fmt: skip
    assert torch.equal(model.weight.detach(), start["weight"])
    ref = torch.nn.Linear(N_IN, N_OUT)
    ref.load_state_dict(start)
    total = torch.zeros(N_OUT)
    for i in range(n):
        ref.zero_grad()
        torch.nn.CrossEntropyLoss()(ref(data.x[i]), data.y[i]).backward()
        g = ref.bias.grad
        total += g * min(1.0, clip / (g.norm().item() + 1e-6))
    assert torch.allclose(model.bias.detach(), start["bias"] - total / n, atol=1e-6)
    # the whole gradient's norm would clip harder: a different step
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after


@pytest.mark.parametrize("which", ["biases", "norms-biases"])
def test_frozen_unet_parameters_stay_bit_identical_under_dp_noise(which):
    """The U-Net path (functorch per-sample gradients), with real noise: only
    the chosen parameters move."""
    plan = TINY_PLAN | {"model": "unet-tiny-gn"}
    model = build_model(plan["model"])
    keep = trainable_names(model, which)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, 16, generator=g)
    y = torch.randint(0, 4, (4, 1, 16, 16, 16), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    from client.tasks.registry import get_task
    from common.config import load_plan
    from sim.runner import default_plan

    p = load_plan({**default_plan(), **plan}, "test")
    local_train(
        model, data, get_task("segmentation").loss(p), epochs=1, batch_size=4,
        learning_rate=0.1, optimizer="adam", device=torch.device("cpu"), seed=0,
        dp=DPSpec(1.0, 1.0, "functorch"), trainable=which,
    )  # fmt: skip
    for name, param in model.named_parameters():
        moved = not torch.equal(param.detach(), start[name])
        assert moved == (name in keep), name
    assert 0 < len(keep) < len(start)
    n_keep = sum(start[k].numel() for k in keep)
    assert n_keep < 0.01 * sum(v.numel() for v in start.values())


def test_norm_parameters_join_only_with_norms_biases():
    net = build_model("unet-tiny-gn")
    biases, norms = trainable_names(net, "biases"), trainable_names(net, "norms-biases")
    assert biases < norms
    assert all(n.endswith(".bias") for n in biases)
    assert any(n.endswith(".weight") for n in norms - biases)
    assert trainable_names(net, "all") == {n for n, _ in net.named_parameters()}
    with pytest.raises(ValueError, match="use all, biases, norms-biases"):
        trainable_names(net, "heads")
    no_bias = torch.nn.Linear(3, 2, bias=False)
    with pytest.raises(ValueError, match="no such parameters"):
        trainable_names(no_bias, "biases")
