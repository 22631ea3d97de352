"""The report's figures, as PNG bytes (matplotlib, Agg backend: no display).

Every function takes plain data (``metrics.jsonl`` entries, ``comparison.json``,
arrays) and returns the PNG, so the HTML report and tests need nothing else.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless coordinator, CI, containers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common import wire  # noqa: E402

DPI = 100


def _png(fig: Any) -> bytes:
    for ax in fig.axes:
        if ax.get_xlabel() == "round":  # rounds are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and v is not None else math.nan


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
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for site, (rs, vs) in sorted(site_series(entries, "evaluate", key).items()):
            ax.plot(rs, vs, marker="o", label=site)
        rs = [int(e["round"]) for e in entries if key in e.get("weighted", {})]
        ws = [_num(e["weighted"][key]) for e in entries if key in e.get("weighted", {})]
        if rs:
            ax.plot(rs, ws, "k--", label="weighted mean")
        ax.set_title(key)
        ax.set_xlabel("round")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title, y=1.03)
    return _png(fig)


def loss_curves(entries: list[dict[str, Any]]) -> bytes:
    """Training loss (sites' local epochs) and validation loss per site."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), squeeze=False)
    for ax, (part, key, name) in zip(
        axes[0],
        [
            ("train", wire.TRAIN_LOSS, "train loss"),
            ("evaluate", wire.EVAL_LOSS, "eval loss"),
        ],
        strict=True,
    ):
        for site, (rs, vs) in sorted(site_series(entries, part, key).items()):
            ax.plot(rs, vs, marker="o", label=site)
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _png(fig)


def epsilon_curves(entries: list[dict[str, Any]]) -> bytes:
    """Cumulative epsilon per site (at the site's own delta)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    series: dict[str, tuple[list[int], list[float]]] = {}
    for e in entries:
        for site, eps in e.get("epsilon", {}).items():
            if eps is not None:
                rs, vs = series.setdefault(site, ([], []))
                rs.append(int(e["round"]))
                vs.append(float(eps))
    for site, (rs, vs) in sorted(series.items()):
        ax.plot(rs, vs, marker="o", label=site)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon (cumulative)")
    ax.set_title("privacy spent per site")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _png(fig)


def spread_curves(entries: list[dict[str, Any]], keys: Sequence[str]) -> bytes:
    """Best minus worst site per metric and round."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key in keys:
        rs = [int(e["round"]) for e in entries if key in e.get("spread", {})]
        vs = [_num(e["spread"][key]) for e in entries if key in e.get("spread", {})]
        if rs:
            ax.plot(rs, vs, marker="o", label=key)
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
    """A labelled heat map with the value written in every cell (NaN: blank)."""
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(
        figsize=(1.3 + 1.1 * len(cols), 1.0 + 0.55 * len(rows) + 0.6)
    )
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    for i in range(matrix.shape[0]):
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
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def sample_slice(
    image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, title: str
) -> bytes:
    """An axial slice (rows: anterior-posterior) with the prediction outlined
    (red) and, when known, the reference (green)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image.T, cmap="gray", origin="lower", vmin=-150, vmax=350)
    if truth is not None and truth.any():
        ax.contour(truth.T > 0, levels=[0.5], colors="lime", linewidths=1.0)
    if pred.any():
        ax.contour(pred.T > 0, levels=[0.5], colors="red", linewidths=1.0)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return _png(fig)
