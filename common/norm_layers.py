"""Personalisation shared by both sides: which state keys are normalisation.

FedBN (Li et al., 2021) keeps normalisation layers local to each site. Both the
coordinator (to refuse a FedBN plan whose network has no normalisation
parameters) and the sites (to keep them) need the same list of keys.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from common.config import ConfigError

NORM_TYPES: tuple[type, ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_keys(model: nn.Module) -> list[str]:
    """State-dict keys (parameters and buffers) of the model's normalisation layers.

    ``_NormBase`` covers BatchNorm and InstanceNorm; GroupNorm's per-channel
    scale and shift count too (the ``-gn`` and ``-ws`` models; a standardised
    convolution's weight is not one). Opacus' ``_module.`` prefix is not part
    of the keys.
    """
    target = model._module if hasattr(model, "_module") else model
    keys = []
    for name, module in target.named_modules():
        if isinstance(module, NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k in module.state_dict()]
    return keys


def require_norm_params(model: nn.Module, model_name: str) -> list[str]:
    """The norm keys for FedBN; an error if the network has none.

    Raises
    ------
    ConfigError
        Naming the plan keys to change.
    """
    keys = norm_keys(model)
    if not keys:
        raise ConfigError(
            f"fedbn=true but model {model_name!r} has no normalisation parameters "
            "(MONAI's InstanceNorm is affine-free by default); choose a model with "
            'affine normalisation, e.g. model="unet-tiny-affine" or '
            'model="unet-tiny-gn" (GroupNorm), or set fedbn=false'
        )
    return keys
