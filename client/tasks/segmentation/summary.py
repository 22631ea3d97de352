"""A one-page PNG of a prediction: three orthogonal slices and the measures.

For a clinician's first look, not for reading the scan: the slices pass through
the largest tumour's centroid (the largest kidney's when there is no tumour),
with the predicted outlines drawn over the CT and each tumour's planning
measures beside them. The volume is first brought to the closest RAS voxel
order (nibabel's ``as_closest_canonical`` reordering: axis flips and swaps, no
resampling), so the views come out the same whatever the scan's storage order.

Display convention: radiological. Axial (seen from the feet) and coronal (seen
from the front) put the patient's right on the viewer's left; axial has
anterior up, coronal and sagittal superior up; sagittal puts anterior on the
viewer's left. Each panel's edges carry the direction letters. Pixels keep
the scan's spacing (axes in mm, equal aspect). No file name or other
identifier is drawn.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from common.atomic import atomic_write_bytes
from common.lesions import components

log = logging.getLogger(__name__)

HU_WINDOW = (-160.0, 240.0)
MAX_LISTED = 5  # tumours listed in the text panel, largest first
# label -> (name, colour): distinct under the common colour-vision deficiencies
CONTOURS: dict[int, tuple[str, str]] = {
    1: ("kidney", "#00c853"),
    2: ("tumour", "#ff1744"),
    3: ("cyst", "#ffd600"),
}
# view -> (fixed canonical axis, horizontal axis, vertical axis,
#          letters at left/right/bottom/top of the panel)
VIEWS: dict[str, tuple[int, int, int, str]] = {
    "axial": (2, 0, 1, "RLPA"),
    "coronal": (1, 0, 2, "RLIS"),
    "sagittal": (0, 1, 2, "APIS"),
}


def _canonical(affine: np.ndarray, shape: tuple[int, ...]) -> tuple:
    """Orientation to the closest RAS order, the new affine and voxel sizes."""
    ornt = nib.orientations.io_orientation(affine)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return ornt, new_affine, np.sqrt((new_affine[:3, :3] ** 2).sum(0))


def _focus(labels: np.ndarray, affine: np.ndarray, measures: list[dict]) -> np.ndarray:
    """World point the slices pass through."""
    if measures:
        largest = max(measures, key=lambda m: m.get("volume-ml", 0.0))
        return np.asarray(largest["centroid-ras-mm"], float)
    lab, n = components(labels > 0)
    if n:
        biggest = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
        ijk = np.argwhere(lab == biggest).mean(0)
    else:
        ijk = (np.array(labels.shape[:3]) - 1) / 2
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _panel(
    ax: Any,
    image: np.ndarray,
    masks: dict[int, np.ndarray] | None,
    spacing: np.ndarray,
    view: str,
    image_kw: dict[str, Any],
) -> None:
    """One slice (``image`` 2D, indexed horizontal x vertical) in radiological
    display: the horizontal axis runs right-to-left (or anterior-to-posterior)."""
    _, h_axis, v_axis, letters = VIEWS[view]
    dh, dv = spacing[h_axis], spacing[v_axis]
    nh, nv = image.shape
    extent = (-dh / 2, (nh - 0.5) * dh, -dv / 2, (nv - 0.5) * dv)
    ax.imshow(
        image.T, origin="lower", extent=extent, interpolation="nearest", **image_kw
    )
    for value, mask in (masks or {}).items():
        if mask.any() and not mask.all() and min(mask.shape) > 1:
            ax.contour(
                np.arange(nh) * dh,
                np.arange(nv) * dv,
                mask.T.astype(np.float32),
                levels=[0.5],
                colors=[CONTOURS[value][1]],
                linewidths=1.2,
            )
    ax.set_xlim(extent[1], extent[0])  # patient right / anterior on the left
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    style = {"color": "white", "fontsize": 9, "fontweight": "bold"}
    for x, y, letter, ha, va in (
        (0.02, 0.5, letters[0], "left", "center"),
        (0.98, 0.5, letters[1], "right", "center"),
        (0.5, 0.02, letters[2], "center", "bottom"),
        (0.5, 0.98, letters[3], "center", "top"),
    ):
        ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, **style)
    ax.set_title(view, fontsize=10)


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def measure_text(measures: list[dict[str, Any]]) -> str:
    """The text panel: one block per tumour, largest first."""
    if not measures:
        return "No tumour predicted."
    blocks = []
    for i, m in enumerate(measures[:MAX_LISTED], start=1):
        exo = m.get("exophytic-fraction")
        lines = [
            f"Tumour {i}: {m.get('side', '?')} kidney, "
            f"{m.get('polar-location') or 'pole n/a'}",
            f"  volume {_fmt(m.get('volume-ml'), ' mL')}",
            f"  max diameter {_fmt(m.get('max-diameter-mm'), ' mm')}",
            f"  exophytic {_fmt(None if exo is None else 100 * exo, '%', 0)}",
            f"  to sinus {_fmt(m.get('distance-to-sinus-mm'), ' mm')} (estimate)",
        ]
        apart = m.get("distance-to-kidney-mm")
        if apart:
            lines.append(f"  {_fmt(apart, ' mm')} from the kidney")
        blocks.append("\n".join(lines))
    if len(measures) > MAX_LISTED:
        blocks.append(f"... and {len(measures) - MAX_LISTED} smaller tumour(s)")
    return "\n\n".join(blocks)


def write_summary_png(
    image_hu: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    measures: list[dict[str, Any]],
    out: Path,
    uncertainty: np.ndarray | None = None,
) -> Path:
    """Write the summary figure as a PNG, atomically.

    Parameters
    ----------
    image_hu : numpy.ndarray
        The scan in HU, 3D, in the scan's voxel order.
    labels : numpy.ndarray
        Predicted label map on the same grid.
    affine : numpy.ndarray
        The scan's voxel-to-world (RAS+ mm) affine.
    measures : list of dict
        :func:`~client.tasks.segmentation.measures.tumour_measures` output.
    out : Path
        The PNG to write (its folder is created).
    uncertainty : numpy.ndarray, optional
        Normalised entropy on the same grid: a second row of the three slices.

    Returns
    -------
    Path
        ``out``.
    """
    affine = np.asarray(affine, float)
    if image_hu.shape[:3] != labels.shape:
        raise ValueError(
            f"image {image_hu.shape} and labels {labels.shape} differ in shape"
        )
    ornt, can_affine, spacing = _canonical(affine, labels.shape)
    image = nib.orientations.apply_orientation(image_hu, ornt)
    lab = nib.orientations.apply_orientation(labels, ornt)
    unc = (
        None
        if uncertainty is None
        else nib.orientations.apply_orientation(uncertainty, ornt)
    )
    point = np.linalg.solve(can_affine, [*_focus(labels, affine, measures), 1.0])
    centre = np.clip(np.rint(point[:3]).astype(int), 0, np.array(lab.shape) - 1)

    rows = 1 if unc is None else 2
    fig = Figure(figsize=(13, 4.3 * rows), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, 4, width_ratios=[1, 1, 1, 0.9])
    lo, hi = HU_WINDOW
    for col, view in enumerate(VIEWS):
        fixed = VIEWS[view][0]
        take = [slice(None)] * 3
        take[fixed] = centre[fixed]
        sl = lab[tuple(take)]
        masks = {v: sl == v for v in CONTOURS}
        ax = fig.add_subplot(grid[0, col])
        kw = {"cmap": "gray", "vmin": lo, "vmax": hi}
        _panel(ax, image[tuple(take)], masks, spacing, view, kw)
        if unc is not None:
            ax_u = fig.add_subplot(grid[1, col])
            kw_u = {"cmap": "magma", "vmin": 0.0, "vmax": 1.0}
            _panel(ax_u, unc[tuple(take)], None, spacing, view, kw_u)
            ax_u.set_title(f"{view}: uncertainty (0-1)", fontsize=10)
    fig.axes[0].legend(
        handles=[Line2D([], [], color=c, label=n) for n, c in CONTOURS.values()],
        loc="lower left",
        fontsize=8,
        framealpha=0.6,
    )
    text_ax = fig.add_subplot(grid[:, 3])
    text_ax.axis("off")
    text_ax.text(
        0.0,
        1.0,
        "Predicted tumours\n(radiological view; HU -160..240)\n\n"
        + measure_text(measures)
        + "\n\nAutomatic segmentation: check against the images.",
        va="top",
        ha="left",
        fontsize=9,
        family="monospace",
        wrap=True,
    )
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.02, top=0.94, wspace=0.06, hspace=0.15
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(out), buf.getvalue())
    log.info("summary image written")
    return Path(out)
