"""Where in a slice the classifier found its class: occlusion sensitivity.

``kidneyfl predict`` draws, beside each slice's JSON, the slice with a map of
how much hiding each region lowers the predicted class's logit. Occlusion is
used rather than Grad-CAM, and implemented here rather than through
``monai.visualize.OcclusionSensitivity``:

- **Resolution.** Grad-CAM's map has the size of its target layer. At the
  registered classifiers' last convolutional stage (the last module with an
  ``(N, C, h, w)`` output in a forward pass, found with forward hooks on
  ``named_modules()``: ``layer4`` of the ResNets, ``class_layers.relu`` of the
  DenseNets) that is 4 x 4 for the ResNets and 2 x 2 for the DenseNets at the
  default 64-pixel slice, and 1 x 1 (a constant map) for ``densenet-small`` at
  32 pixels, while a stone is 2-4 pixels. Occlusion's resolution is the
  occluder's, set here to an eighth of the slice whatever the network.
- **Faithfulness.** The map is the model's actual change of output when a
  region is hidden, not a first-order (gradient) estimate of it. Its limits:
  the occluder is an input the model never saw in training, and with the
  classifiers' global max-pooling, evidence that appears twice (two stones)
  shows weakly, since hiding one copy leaves the other.
- **Normalisation and eval mode.** Only forward passes in eval mode, under
  ``torch.no_grad``: no hook, no gradient, no ``requires_grad`` change, so the
  model is left as it was (its ``training`` flags are restored), and an
  Opacus-wrapped module works as a plain one. GroupNorm keeps no running
  statistics, so eval mode is the normalisation training used; weight-
  standardised convolutions are just part of the forward. GroupNorm does
  normalise over the whole slice, so hiding a patch also shifts every
  location's statistics a little: the map measures that too, as the model
  would see it.
- **Cost.** ``(2 / 0.125 + 1)^2 = 289`` forward passes per slice, batched
  (Grad-CAM: one forward and one backward), the same count at any slice size.
  Measured at 64 pixels on one thread of a busy CPU: 0.1-0.2 s for
  ``resnet-tiny`` and ``densenet-small``, 3-5 s for ``densenet121`` and
  ``resnet18``; once per slice, at prediction only.

Why not MONAI 1.6.1's implementations: ``GradCAM``'s ``ModelWithHooks``
registers forward and backward hooks on the model and keeps no handle to
remove them, its default post-processing maps the largest value to 0, it
fills the parameters' ``.grad``, and on a module called twice per forward
(the residual block's ReLU) it pairs one call's activation with the other
call's gradient. ``OcclusionSensitivity`` raises ``RuntimeError`` with a callable
fill; its own fills are a hard-edged square (which a network's first layers
read as a boundary) or a multiplication towards 0, the bottom of the CT window
(fat or air): a dark blob, much like a cyst.

Here each occluder is a separable periodic Hann window (no edges) that blends
the slice towards the slice's mean intensity (neither a dark lesion nor a
bright stone), moved by half its width so the windows covering any pixel
weigh 1 in all. The score is the class's logit, as in Grad-CAM, not its
probability: the softmax would also drop when hiding a region adds evidence
for another class.

Nothing here leaves the site.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

METHOD = "occlusion-sensitivity"  # the summary's ``saliency-method``
OCCLUDER_FRACTION = 0.125  # occluder width as a fraction of the slice's side
BATCH = 32  # occluded slices per forward pass
PNG_SIDE = 512  # the PNG's longer side, in pixels, about
_DPI = 100
_FLAT = 1e-5  # a peak drop below this (relative to the logit) is no evidence


def saliency_map(
    model: nn.Module, x: torch.Tensor, class_index: int, batch: int = BATCH
) -> np.ndarray:
    """Occlusion sensitivity of one slice for one class (module docstring).

    Parameters
    ----------
    model : nn.Module
        A classifier, ``(N, C, H, W) -> (N, classes)`` logits. Left in the
        ``training`` state it came in; no gradient is computed.
    x : torch.Tensor
        The slice as the model takes it, ``(1, C, H, W)``, on the model's device.
    class_index : int
        The class whose evidence is mapped (``predict``: the predicted one).
    batch : int
        Occluded slices per forward pass.

    Returns
    -------
    np.ndarray
        ``(H, W)`` float32 in [0, 1]: the drop of the class's logit when the
        region around each pixel is hidden, over its largest drop. All zeros
        when hiding no region lowers the logit.

    Raises
    ------
    ValueError
        ``x`` is not one ``(1, C, H, W)`` slice, ``class_index`` is not a
        class of the model, or the model's logits are not finite.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(
            f"expected one slice of shape (1, C, H, W), got {tuple(x.shape)}"
        )
    h, w = x.shape[-2:]
    rows, cols = _windows(h, x), _windows(w, x)  # (A, H), (B, W)
    fill = x.mean(dim=(2, 3), keepdim=True)
    with _eval_mode(model), torch.no_grad():
        logits = model(x)
        if not 0 <= class_index < logits.shape[1]:
            raise ValueError(
                f"class_index {class_index} is not one of the model's "
                f"{logits.shape[1]} classes"
            )
        score = logits[0, class_index]
        a, b = torch.meshgrid(
            torch.arange(len(rows), device=x.device),
            torch.arange(len(cols), device=x.device),
            indexing="ij",
        )
        a, b = a.reshape(-1), b.reshape(-1)
        drops = torch.empty(len(a), dtype=x.dtype, device=x.device)
        for start in range(0, len(a), batch):
            ia, ib = a[start : start + batch], b[start : start + batch]
            hide = (rows[ia][:, :, None] * cols[ib][:, None, :])[:, None]
            occluded = x * (1 - hide) + fill * hide
            drops[start : start + batch] = score - model(occluded)[:, class_index]
    if not torch.isfinite(drops).all() or not torch.isfinite(score):
        raise ValueError("the model's logits are not finite; no saliency map")
    # Each pixel's drop is the drops of the windows over it, weighed by how much
    # each hides it: R^T D C; the weights sum to 1 (periodic Hann, half steps).
    d = drops.reshape(len(rows), len(cols))
    weight = rows.T @ torch.ones_like(d) @ cols
    sal = torch.clamp((rows.T @ d @ cols) / weight.clamp_min(1e-12), min=0)
    peak = float(sal.max())
    if peak <= _FLAT * (1 + abs(float(score))):
        log.info("hiding no region lowers the class's logit; the saliency map is 0")
        return np.zeros((h, w), dtype=np.float32)
    return (sal / peak).clamp(0, 1).cpu().numpy().astype(np.float32)


def _windows(n: int, like: torch.Tensor) -> torch.Tensor:
    """Occluder weights along one axis of ``n`` pixels, one row per position.

    Periodic Hann windows of even width ``m``, starting every ``m / 2`` pixels
    from ``-m / 2``: every pixel lies under exactly two windows whose weights
    (``sin^2`` and ``cos^2``) sum to 1.
    """
    m = max(4, 2 * round(n * OCCLUDER_FRACTION / 2))
    hann = torch.sin(torch.pi * torch.arange(m, dtype=torch.float64) / m) ** 2
    starts = range(-(m // 2), n, m // 2)
    out = torch.zeros((len(starts), n), dtype=torch.float64)
    for i, s in enumerate(starts):
        lo, hi = max(s, 0), min(s + m, n)
        out[i, lo:hi] = hann[lo - s : hi - s]
    return out.to(device=like.device, dtype=like.dtype)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, each module's own ``training`` flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def write_saliency_png(
    slice_image: np.ndarray,
    saliency: np.ndarray,
    out: Path,
    title: str,
    xy_axes: bool = False,
) -> Path:
    """Draw a slice in grey with a saliency map over it and write it as a PNG.

    The PNG has the slice's aspect, each slice pixel drawn as a square block
    (the longer side about 512 pixels); the title is drawn in the top left
    corner, over the image, so it does not change the aspect. The map is
    overlaid with a colour map whose opacity grows with the value: low
    saliency leaves the slice visible. The file is written atomically.

    Parameters
    ----------
    slice_image : np.ndarray
        ``(H, W)`` slice, windowed to [0, 1] as the classifier takes it (values
        outside are drawn as black or white).
    saliency : np.ndarray
        ``(H, W)`` map in [0, 1], on the slice's grid.
    out : Path
        The PNG to write; its folder is created.
    title : str
        Drawn as typed (no math or TeX parsing).
    xy_axes : bool
        The arrays' first axis is x and the second y (a canonical NIfTI
        slice): drawn transposed with y up, as the report draws slices.
        False: rows and columns, as a PNG slice.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    ValueError
        The arrays are not 2D, differ in shape, or are not finite.
    """
    # matplotlib only here: training and the CLI never load it
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    image, sal = np.asarray(slice_image, float), np.asarray(saliency, float)
    if image.ndim != 2 or image.shape != sal.shape:
        raise ValueError(
            f"slice {image.shape} and saliency {sal.shape} must be 2D, one shape"
        )
    if not (np.isfinite(image).all() and np.isfinite(sal).all()):
        raise ValueError("slice and saliency must be finite")
    if xy_axes:
        image, sal = image.T, sal.T
    origin = "lower" if xy_axes else "upper"
    rows, cols = image.shape
    scale = max(1, round(PNG_SIDE / max(rows, cols)))
    fig = Figure(figsize=(cols * scale / _DPI, rows * scale / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.imshow(
        image, cmap="gray", vmin=0, vmax=1, interpolation="nearest", origin=origin
    )
    rgba = colormaps["turbo"](np.linspace(0, 1, 256))
    rgba[:, 3] = np.linspace(0, 0.7, 256)  # transparent where nothing matters
    overlay = ListedColormap(rgba, name="saliency")
    ax.imshow(
        np.clip(sal, 0, 1),
        cmap=overlay,
        vmin=0,
        vmax=1,
        interpolation="bilinear",
        origin=origin,
    )
    text = ax.text(
        0.01,
        0.99,
        title,
        transform=ax.transAxes,
        ha="left",
        va="top",
        color="white",
        fontsize=max(6, min(12, rows * scale / 40)),
        bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 2},
    )
    text.set_parse_math(False)
    text.set_usetex(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out
