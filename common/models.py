"""Registry of networks by name. Every entry trains under Opacus unchanged.

Rules for an entry: no BatchNorm (InstanceNorm or GroupNorm only), no in-place
activations (Opacus' backward hooks forbid them), and a ``grad_sample_mode``
chosen by measurement (see docs/architecture.md and benchmarks/dp_overhead.py).

The ``-gn`` and ``-ws`` U-Nets are the normalisations DP-SGD work uses with
per-sample gradients: GroupNorm (Wu and He, 2018), and weight standardisation
(Qiao et al., 2019) with GroupNorm, as in De et al. (2022).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import BasicUNet, DenseNet, ResNet, UNet
from monai.networks.nets.resnet import ResNetBlock
from torch import nn

from common.prognosis_net import build_cnn, build_linear

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
    channels: tuple[int, ...],
    res_units: int,
    affine: bool = False,
    groups: int = 0,
    standardise: bool = False,
) -> Callable[[int, int], nn.Module]:
    """A 3D MONAI UNet builder.

    ``groups`` > 0 swaps InstanceNorm for GroupNorm with that many groups;
    ``standardise`` then also standardises the weights of every convolution a
    norm layer follows.
    """

    def build(in_channels: int, out_channels: int) -> nn.Module:
        net = UNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=res_units,
            norm=_unet_norm(channels, out_channels, affine, groups),
        )
        return _standardise_normed_convs(net) if standardise else net

    return build


def _unet_norm(
    channels: tuple[int, ...], out_channels: int, affine: bool, groups: int
) -> str | tuple[str, dict[str, object]]:
    if groups:
        # MONAI's UNet also normalises its top up-sampling layer's out_channels
        if any(c % groups for c in (*channels, out_channels)):
            raise ValueError(
                f"GroupNorm with {groups} groups needs channel counts divisible by "
                f"{groups}; got channels {channels} and {out_channels} outputs: "
                "choose a model without -gn/-ws or another number of classes"
            )
        return ("group", {"num_groups": groups})  # affine: a scale and shift
    # InstanceNorm3d keeps no running stats (DP-safe); affine=True adds a
    # per-channel scale and shift that FedBN can keep local to a site
    return ("instance", {"affine": True}) if affine else "instance"


def _standardised(weight: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Zero mean and unit variance over each output channel's fan-in."""
    dims: list[int] = []
    for d in range(weight.dim()):  # a loop, not a comprehension: TorchScript
        if d != out_dim:
            dims.append(d)
    var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)
    return (weight - mean) * torch.rsqrt(var + 1e-5)


class WSConv3d(nn.Conv3d):
    """Conv3d with its weight standardised in every forward (Qiao et al., 2019).

    Opacus matches grad samplers by exact type, so this subclass is not taken
    for a plain Conv3d: its per-sample gradients go through functorch, through
    the standardisation, in both ``hooks`` and ``functorch`` modes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _standardised(self.weight, 0), self.bias)


class WSConvTranspose3d(nn.ConvTranspose3d):
    """ConvTranspose3d with its weight standardised per output channel."""

    def forward(
        self, x: torch.Tensor, output_size: list[int] | None = None
    ) -> torch.Tensor:
        # as nn.ConvTranspose3d.forward, with the standardised weight
        padding = self._output_padding(
            x,
            output_size,
            self.stride,
            self.padding,
            self.kernel_size,
            3,
            self.dilation,
        )
        weight = _standardised(self.weight, 1)  # (in, out / groups, *kernel)
        return F.conv_transpose3d(
            x,
            weight,
            self.bias,
            self.stride,
            self.padding,
            padding,
            self.groups,
            self.dilation,
        )


_WS_TYPES: dict[type, type] = {
    nn.Conv3d: WSConv3d,
    nn.ConvTranspose3d: WSConvTranspose3d,
}


def _standardise_normed_convs(net: nn.Module) -> nn.Module:
    """Weight-standardise each MONAI ``Convolution`` whose output is normalised.

    Convolutions without a norm after them (the residual shortcuts, the output
    layer) keep their weights' scale: nothing after them would undo it, and the
    output layer's sets the logits' scale. The subclasses add
    no state, only a forward, so the class is swapped in place: same parameters,
    same initialisation, same state_dict keys.
    """
    for block in net.modules():
        if isinstance(block, Convolution) and hasattr(getattr(block, "adn", None), "N"):
            block.conv.__class__ = _WS_TYPES[type(block.conv)]
    return net


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
    "unet-tiny-gn": ModelSpec(
        "unet-tiny-gn",
        "segmentation",
        _unet((4, 8, 16, 32), res_units=1, groups=2),
        "functorch",
        "unet-tiny with GroupNorm, 2 groups (2-16 channels a group; ~39 k parameters)",
    ),
    "unet-tiny-ws": ModelSpec(
        "unet-tiny-ws",
        "segmentation",
        _unet((4, 8, 16, 32), res_units=1, groups=2, standardise=True),
        "functorch",
        "unet-tiny-gn with weight-standardised convolutions before each norm "
        "(~39 k parameters)",
    ),
    "unet-small-gn": ModelSpec(
        "unet-small-gn",
        "segmentation",
        _unet((8, 16, 32, 64), res_units=1, groups=4),
        "functorch",
        "unet-small with GroupNorm, 4 groups (2-16 channels a group, 1 at the "
        "4-class top layer; ~0.15 M parameters)",
    ),
    "unet-small-ws": ModelSpec(
        "unet-small-ws",
        "segmentation",
        _unet((8, 16, 32, 64), res_units=1, groups=4, standardise=True),
        "functorch",
        "unet-small-gn with weight-standardised convolutions before each norm "
        "(~0.15 M parameters)",
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
    "prognosis-cnn": ModelSpec(
        "prognosis-cnn",
        "prognosis",
        build_cnn,
        "hooks",
        "3D CNN (8-32 channels) over the tumour crop plus age, sex and size "
        "(~19 k parameters); the prognosis default",
    ),
    "prognosis-linear": ModelSpec(
        "prognosis-linear",
        "prognosis",
        build_linear,
        "hooks",
        "age, sex and tumour size only, one linear layer: the baseline",
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
