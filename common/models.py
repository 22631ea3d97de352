"""Registry of networks by name. Every entry trains under Opacus unchanged.

Rules for an entry: no BatchNorm (InstanceNorm or GroupNorm only), no in-place
activations (Opacus' backward hooks forbid them), and a ``grad_sample_mode``
chosen by measurement (see docs/architecture.md and benchmarks/dp_overhead.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.networks.nets import BasicUNet, UNet
from torch import nn

NUM_SEG_CLASSES = 4  # background, kidney, tumour, cyst (KiTS21/23)


@dataclass(frozen=True)
class ModelSpec:
    """A registered network.

    Attributes
    ----------
    build : callable
        ``build(in_channels, out_channels) -> nn.Module``.
    grad_sample_mode : str
        Opacus per-sample gradient mode used under DP-SGD. ``functorch`` measured
        about 2x the non-private step on CPU for MONAI U-Nets, ``hooks`` 2.6-4x,
        and ``ew`` fails on ConvTranspose3d and PReLU.
    """

    name: str
    task: str
    build: Callable[[int, int], nn.Module]
    grad_sample_mode: str
    description: str


def _unet(
    channels: tuple[int, ...], res_units: int, affine: bool = False
) -> Callable[[int, int], nn.Module]:
    def build(in_channels: int, out_channels: int) -> nn.Module:
        return UNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=res_units,
            # InstanceNorm3d keeps no running stats (DP-safe); affine=True adds a
            # per-channel scale and shift that FedBN can keep local to a site
            norm=("instance", {"affine": True}) if affine else "instance",
        )

    return build


def _basic_unet(in_channels: int, out_channels: int) -> nn.Module:
    return BasicUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        features=(8, 16, 32, 64, 128, 8),
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
        norm=("instance", {"affine": True}),
    )


MODELS: dict[str, ModelSpec] = {
    "unet-tiny": ModelSpec(
        "unet-tiny",
        "segmentation",
        _unet((4, 8, 16, 32), res_units=1),
        "functorch",
        "MONAI UNet, 4 levels of 4-32 channels (~39 k parameters); the DP demo default",
    ),
    "unet-tiny-affine": ModelSpec(
        "unet-tiny-affine",
        "segmentation",
        _unet((4, 8, 16, 32), res_units=1, affine=True),
        "functorch",
        "unet-tiny with affine InstanceNorm (per-channel scale and shift): for FedBN",
    ),
    "unet-small": ModelSpec(
        "unet-small",
        "segmentation",
        _unet((8, 16, 32, 64), res_units=1),
        "functorch",
        "MONAI UNet, 4 levels of 8-64 channels (~0.15 M parameters)",
    ),
    "unet": ModelSpec(
        "unet",
        "segmentation",
        _unet((16, 32, 64, 128, 256), res_units=2),
        "functorch",
        "MONAI UNet, 5 levels of 16-256 channels (~4.8 M parameters); for GPUs",
    ),
    "basicunet-small": ModelSpec(
        "basicunet-small",
        "segmentation",
        _basic_unet,
        "functorch",
        "MONAI BasicUNet with out-of-place LeakyReLU and affine InstanceNorm",
    ),
}


def get_model_spec(name: str) -> ModelSpec:
    """Look a network up by name.

    Raises
    ------
    KeyError
        Listing the registered names.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}"
        ) from None


def build_model(
    name: str, in_channels: int = 1, out_channels: int = NUM_SEG_CLASSES, seed: int = 0
) -> nn.Module:
    """Build a registered network with deterministic initial weights."""
    spec = get_model_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(in_channels, out_channels)
