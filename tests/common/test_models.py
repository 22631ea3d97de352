import pytest
import torch
from opacus.validators import ModuleValidator

from common.config import Plan
from common.models import MODELS, build_model, get_model_spec
from common.task_models import build_plan_model
from common.weights import NonFiniteWeightsError, export_state, import_state


@pytest.mark.parametrize(
    "name", sorted(n for n, s in MODELS.items() if s.task == "segmentation")
)  # classification networks: tests/client/test_classification.py
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


def test_weights_round_trip_through_arrayrecord():
    from flwr.app import ArrayRecord

    model = build_plan_model(Plan(model="unet-small"))
    state = export_state(model)
    record = ArrayRecord(state)
    back = record.to_torch_state_dict()
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    other = build_model("unet-small", seed=99)
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
