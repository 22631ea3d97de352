"""Registry of networks by name. Every entry trains under Opacus unchanged.

Rules for an entry: no BatchNorm (InstanceNorm or GroupNorm only), no in-place
activations (Opacus' backward hooks forbid them), and a ``grad_sample_mode``
chosen by measurement (see docs/architecture.md and benchmarks/dp_overhead.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.networks.nets import BasicUNet, DenseNet, ResNet, UNet
from monai.networks.nets.resnet import ResNetBlock
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


# Classification networks (issue 8): 2D, one CT slice in, class logits out.
# GroupNorm instead of BatchNorm (per-sample gradients need no batch
# statistics; InstanceNorm would see a 2x2 map at the last DenseNet stage) and
# out-of-place ReLU and residual adds (Opacus' backward hooks forbid in-place).
_RELU = ("relu", {"inplace": False})
_GROUP = ("group", {"num_groups": 4})


class _ResidualBlock(ResNetBlock):
    """MONAI's basic ResNet block with the residual added out of place.

    MONAI 1.6.1's ``ResNet._make_layer`` passes neither ``act`` nor ``norm`` to
    its blocks (they would get in-place ReLU and BatchNorm), so they are fixed
    here.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.update(act=_RELU, norm=_GROUP)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)


def _resnet(
    layers: tuple[int, ...], planes: tuple[int, ...], stem_stride: int = 2
) -> Callable[[int, int], nn.Module]:
    def build(in_channels: int, out_channels: int) -> nn.Module:
        net = ResNet(
            block=_ResidualBlock,
            layers=list(layers),
            block_inplanes=list(planes),
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=3,
            conv1_t_stride=2,
            no_max_pool=True,
            num_classes=out_channels,
            act=_RELU,
            norm=_GROUP,
        )
        # Global max-pooling: a lesion is a few pixels of a slice, and average
        # pooling dilutes it (measured: far slower to learn on the phantoms).
        net.avgpool = nn.AdaptiveMaxPool2d(1)
        return _batch_to_group(net)

    return build


def _batch_to_group(module: nn.Module) -> nn.Module:
    """Replace BatchNorm2d (MONAI 1.6.1's ResNet shortcut ignores ``norm``)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(4, child.num_features))
        else:
            _batch_to_group(child)
    return module


def _densenet(
    features: int, growth: int, blocks: tuple[int, ...]
) -> Callable[[int, int], nn.Module]:
    def build(in_channels: int, out_channels: int) -> nn.Module:
        net = DenseNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            init_features=features,
            growth_rate=growth,
            block_config=blocks,
            act=_RELU,
            norm=_GROUP,
        )
        net.class_layers.pool = nn.AdaptiveMaxPool2d(1)  # as for the ResNets
        return net

    return build


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
    "resnet-tiny": ModelSpec(
        "resnet-tiny",
        "classification",
        # Full resolution into layer 1: a stone is 2-4 pixels of a 64^2 slice.
        _resnet((1, 1, 1, 1), (8, 16, 32, 32)),
        "hooks",
        "MONAI ResNet 2D, one basic block per stage, 8-32 channels (~39 k "
        "parameters); the classification DP default on CPU",
    ),
    "resnet18": ModelSpec(
        "resnet18",
        "classification",
        _resnet((2, 2, 2, 2), (64, 128, 256, 512)),
        "hooks",
        "MONAI ResNet-18 2D (~11 M parameters); for GPUs",
    ),
    "densenet-small": ModelSpec(
        "densenet-small",
        "classification",
        _densenet(16, 8, (2, 2, 2, 2)),
        "hooks",
        "MONAI DenseNet 2D, 4 blocks of 2 layers, growth 8 (~27 k parameters)",
    ),
    "densenet121": ModelSpec(
        "densenet121",
        "classification",
        _densenet(64, 32, (6, 12, 24, 16)),
        "hooks",
        "MONAI DenseNet121 2D (~7 M parameters); for GPUs",
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
