import copy

import pytest
import torch
from monai.networks.blocks import Convolution
from opacus.grad_sample.utils import prepare_module
from opacus.validators import ModuleValidator
from torch.utils.data import TensorDataset

from client.privacy.dpsgd import DPSpec
from client.train import local_train
from common.config import Plan
from common.models import MODELS, build_model, get_model_spec
from common.task_models import build_plan_model
from common.weights import NonFiniteWeightsError, export_state, import_state
from tests.fakes import assert_each_case_own_gradient

# classification networks: tests/client/test_classification.py
SEG = sorted(n for n, s in MODELS.items() if s.task == "segmentation")
# Per-sample gradients and a DP step on CPU for networks under 1 M parameters;
# the larger ones (for GPUs) get the forward and Opacus' validation only here.
TRAINED_HERE = [
    n for n in SEG if sum(p.numel() for p in build_model(n).parameters()) < 1e6
]


def _cases(n=3, seed=0):
    """``n`` tiny volumes and label maps: a 4-level U-Net ends at 2^3 voxels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, 16, generator=g)
    return x, torch.randint(0, 4, (n, 16, 16, 16), generator=g)


@pytest.mark.parametrize("name", SEG)
def test_forward_shape_and_opacus_clean(name):
    model = build_model(name)
    out = model(torch.zeros(2, 1, 32, 32, 16))
    assert out.shape == (2, 4, 32, 32, 16)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()
    )


def test_same_seed_same_weights_everywhere():
    a, b = build_model("unet-small", seed=3), build_model("unet-small", seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = build_model("unet-small", seed=4)
    assert not all(torch.equal(sa[k], c.state_dict()[k]) for k in sa)


def test_unknown_model_lists_registry():
    with pytest.raises(KeyError, match="unet-small"):
        get_model_spec("resnet-9000")


@pytest.mark.parametrize("name", TRAINED_HERE)
def test_per_sample_gradients_are_each_cases_own(name):
    """Opacus' per-sample gradients, in the registry's mode, equal each case's
    gradient computed alone: nothing in the network mixes cases in a batch, and
    every parameter (norm scales, standardised convolutions) gets one."""
    model = build_model(name, seed=1)
    alone = copy.deepcopy(model)
    net = prepare_module(model, MODELS[name].grad_sample_mode, loss_reduction="sum")
    x, y = _cases()
    loss = torch.nn.CrossEntropyLoss()
    # one term per case, each the mean over its voxels as ``loss`` computes it
    per_case = torch.nn.CrossEntropyLoss(reduction="none")(net(x), y).mean((1, 2, 3))
    per_case.sum().backward()
    assert_each_case_own_gradient(model, alone, x, y, loss)
    net.remove_hooks()


@pytest.mark.parametrize("name", TRAINED_HERE)
def test_dp_step_at_zero_noise_is_the_plain_step_and_round_trips(name):
    """The site's DP-SGD path with the registry's mode, noise 0 and a clipping
    bound no gradient reaches, takes the plain SGD step (every case drawn,
    q = 1); the trained state leaves through ``common.weights`` and a fresh
    build from it computes the same outputs."""
    x, y = _cases()
    train = dict(
        epochs=1,
        batch_size=len(x),
        learning_rate=0.1,
        optimizer="sgd",
        device=torch.device("cpu"),
        seed=0,
    )
    loss = torch.nn.CrossEntropyLoss()
    plain, private = build_model(name, seed=2), build_model(name, seed=2)
    start = copy.deepcopy(plain.state_dict())
    local_train(plain, TensorDataset(x, y), loss, **train)
    dp = DPSpec(0.0, 1e6, MODELS[name].grad_sample_mode)
    local_train(private, TensorDataset(x, y), loss, dp=dp, **train)
    want, got = plain.state_dict(), export_state(private)
    assert list(got) == list(want)  # no ``_module.`` prefix
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=1e-4, atol=1e-6), k
    assert any(not torch.equal(start[k], v) for k, v in got.items())
    fresh = build_model(name, seed=9)
    import_state(fresh, got)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), private.eval()(x))


NORMED_CONVS = [n for n in SEG if n.endswith("-ws")]


@pytest.mark.parametrize("name", NORMED_CONVS)
def test_weight_standardisation_makes_normed_convolutions_scale_free(name):
    """A standardised convolution's weights act only through their pattern:
    scaling and shifting them changes nothing; in the ``-gn`` twin it does."""
    x, _ = _cases(2)
    for twin, scale_free in ((name, True), (name.replace("-ws", "-gn"), False)):
        model = build_model(twin).eval()
        with torch.no_grad():
            before = model(x)
            for block in model.modules():
                if isinstance(block, Convolution) and hasattr(
                    getattr(block, "adn", None), "N"
                ):
                    block.conv.weight.mul_(3.0).add_(0.1)
            change = (model(x) - before).norm() / before.norm()
        assert (change < 1e-3) == scale_free, (twin, float(change))


def test_groupnorm_needs_channels_divisible_by_its_groups():
    two = build_model("unet-tiny-gn", out_channels=2)
    assert two(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="divisible by 2.*-gn/-ws"):
        build_model("unet-tiny-gn", out_channels=3)


@pytest.mark.parametrize("name", SEG)
def test_weights_round_trip_through_arrayrecord(name):
    from flwr.app import ArrayRecord

    model = build_plan_model(Plan(model=name))
    state = export_state(model)
    record = ArrayRecord(state)
    back = record.to_torch_state_dict()
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    other = build_model(name, seed=99)
    import_state(other, back)
    assert all(torch.equal(other.state_dict()[k], state[k]) for k in state)


def test_opacus_prefix_removed_and_nan_refused():
    from opacus import GradSampleModule

    model = build_model("unet-small")
    wrapped = GradSampleModule(model)
    assert any(k.startswith("_module.") for k in wrapped.state_dict())
    state = export_state(wrapped)
    assert not any(k.startswith("_module.") for k in state)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="NaN"):
        export_state(model)
