"""FedBN's normalisation keys for the GroupNorm networks (``-gn``, ``-ws``)."""

import pytest
import torch
from opacus.grad_sample.utils import prepare_module

from common.config import ConfigError, Plan
from common.models import MODELS
from common.norm_layers import norm_keys, require_norm_params
from common.task_models import build_plan_model

GROUP_NORM = sorted(n for n in MODELS if n.endswith(("-gn", "-ws")))


@pytest.mark.parametrize("name", GROUP_NORM)
def test_groupnorm_scale_and_shift_are_what_fedbn_keeps(name):
    """Every GroupNorm's weight and bias, and nothing else: a site under
    ``fedbn=true`` keeps exactly these and sends every convolution (standardised
    or not) to the federation."""
    model = build_plan_model(Plan(model=name, fedbn=True))
    groups = [n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    assert groups
    expected = {f"{n}.{p}" for n in groups for p in ("weight", "bias")}
    keys = require_norm_params(model, name)
    assert set(keys) == expected
    assert len(keys) == len(expected)
    # the same keys when the site has wrapped the model for DP-SGD
    assert norm_keys(prepare_module(model, MODELS[name].grad_sample_mode)) == keys


def test_a_model_without_norm_parameters_names_the_groupnorm_choice():
    with pytest.raises(ConfigError, match='"unet-tiny-gn".*fedbn=false'):
        require_norm_params(build_plan_model(Plan(model="unet-tiny")), "unet-tiny")
