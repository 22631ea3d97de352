"""The report's figures, as PNG bytes (matplotlib, Agg backend: no display).

Every function takes plain data (``metrics.jsonl`` entries, ``comparison.json``,
arrays) and returns the PNG, so the HTML report and tests need nothing else.

Labels, titles and legends carry site names and metric keys, which a site
chose. Every text of a figure is therefore drawn with math parsing and TeX
off (``Text.set_parse_math(False)``, ``set_usetex(False)``: a ``$\\frac{}{}$``
in a name is drawn as typed, never parsed), and every label is cut and
cleaned by :func:`~server.reporting.text.safe_text` first. Figures are matplotlib
``Figure`` objects, not pyplot's: no global figure list, so a live report and
the final one can draw at the same time.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

from common import wire
from server.reporting.text import NAME_LIMIT, safe_text

DPI = 100
MAX_ANNOTATED = 20  # heat maps larger than this are drawn without numbers


def label(text: Any, limit: int = NAME_LIMIT) -> str:
    """A site's name or a metric key as a figure label: cleaned, cut, and never
    starting with ``_`` (matplotlib leaves such labels out of legends)."""
    text = safe_text(text, limit)
    return f" {text}" if text.startswith("_") else text


def _png(fig: Figure) -> bytes:
    for ax in fig.axes:
        if ax.get_xlabel() == "round":  # rounds are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Every text is plain: per text, not through rcParams, which every thread
    # of the process shares. Tick labels made later, while drawing, are
    # numbers from the axis' formatter.
    for text in fig.findobj(Text):
        text.set_usetex(False)
        text.set_parse_math(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else math.nan


def site_series(
    entries: list[dict[str, Any]], part: str, key: str
) -> dict[str, tuple[list[int], list[float]]]:
    """``{site: (rounds, values)}`` of one metric from ``entries[*][part]``."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for e in entries:
        for site, m in e.get(part, {}).items():
            if isinstance(m, dict) and key in m:
                rs, vs = out.setdefault(site, ([], []))
                rs.append(int(e["round"]))
                vs.append(_num(m[key]))
    return out


def metric_curves(
    entries: list[dict[str, Any]], keys: Sequence[str], title: str
) -> bytes:
    """One panel per metric: a line per site and the case-weighted mean."""
    n = len(keys)
    fig = Figure(figsize=(4.2 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for site, (rs, vs) in sorted(site_series(entries, "evaluate", key).items()):
            ax.plot(rs, vs, marker="o", label=label(site))
        rs = [int(e["round"]) for e in entries if key in e.get("weighted", {})]
        ws = [_num(e["weighted"][key]) for e in entries if key in e.get("weighted", {})]
        if rs:
            ax.plot(rs, ws, "k--", label="weighted mean")
        ax.set_title(label(key))
        ax.set_xlabel("round")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(label(title), y=1.03)
    return _png(fig)


def loss_curves(entries: list[dict[str, Any]]) -> bytes:
    """Training loss (sites' local epochs) and validation loss per site."""
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2, squeeze=False)
    for ax, (part, key, name) in zip(
        axes[0],
        [
            ("train", wire.TRAIN_LOSS, "train loss"),
            ("evaluate", wire.EVAL_LOSS, "eval loss"),
        ],
        strict=True,
    ):
        for site, (rs, vs) in sorted(site_series(entries, part, key).items()):
            ax.plot(rs, vs, marker="o", label=label(site))
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _png(fig)


def epsilon_curves(entries: list[dict[str, Any]]) -> bytes:
    """Cumulative epsilon per site (at the site's own delta)."""
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    series: dict[str, tuple[list[int], list[float]]] = {}
    for e in entries:
        for site, eps in e.get("epsilon", {}).items():
            if isinstance(eps, int | float):
                rs, vs = series.setdefault(site, ([], []))
                rs.append(int(e["round"]))
                vs.append(float(eps))
    for site, (rs, vs) in sorted(series.items()):
        ax.plot(rs, vs, marker="o", label=label(site))
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon (cumulative)")
    ax.set_title("privacy spent per site")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _png(fig)


def spread_curves(entries: list[dict[str, Any]], keys: Sequence[str]) -> bytes:
    """Best minus worst site per metric and round."""
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    for key in keys:
        rs = [int(e["round"]) for e in entries if key in e.get("spread", {})]
        vs = [_num(e["spread"][key]) for e in entries if key in e.get("spread", {})]
        if rs:
            ax.plot(rs, vs, marker="o", label=label(key))
    ax.set_xlabel("round")
    ax.set_title("best-worst site spread")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


def heatmap(
    matrix: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    fmt: str = ".3f",
    cmap: str = "viridis",
) -> bytes:
    """A labelled heat map with the value written in every cell (NaN: blank).

    Cells are numbered only up to :data:`MAX_ANNOTATED` rows and columns: each
    number is a text to lay out, and a plan with many classes would make the
    figure slow and unreadable.
    """
    matrix = np.asarray(matrix, dtype=float)
    fig = Figure(figsize=(1.3 + 1.1 * len(cols), 1.0 + 0.55 * len(rows) + 0.6))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, aspect="auto")
    ax.set_xticks(
        range(len(cols)), labels=[label(c) for c in cols], rotation=30, ha="right"
    )
    ax.set_yticks(range(len(rows)), labels=[label(r) for r in rows])
    annotate = max(matrix.shape, default=0) <= MAX_ANNOTATED
    for i in range(matrix.shape[0] if annotate else 0):
        for j in range(matrix.shape[1]):
            if np.isfinite(matrix[i, j]):
                r, g, b, _ = im.cmap(im.norm(matrix[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(
                    j,
                    i,
                    format(matrix[i, j], fmt),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
    ax.set_xlabel(label(xlabel))
    ax.set_ylabel(label(ylabel))
    ax.set_title(label(title, 2 * NAME_LIMIT))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def sample_slice(
    image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, title: str
) -> bytes:
    """An axial slice (rows: anterior-posterior) with the prediction outlined
    (red) and, when known, the reference (green)."""
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    ax.imshow(image.T, cmap="gray", origin="lower", vmin=-150, vmax=350)
    if truth is not None and truth.any():
        ax.contour(truth.T > 0, levels=[0.5], colors="lime", linewidths=1.0)
    if pred.any():
        ax.contour(pred.T > 0, levels=[0.5], colors="red", linewidths=1.0)
    ax.set_title(label(title, 2 * NAME_LIMIT), fontsize=9)
    ax.axis("off")
    return _png(fig)
