"""The prognosis report's figure: Kaplan-Meier step curves by predicted risk
group, one panel per site (all sites first), with the number at risk at each
interval's start under each panel (issue 30; docs/prognosis.md).

The curves come from the released counts only
(:func:`server.reporting.survival.km_curve`); this module draws them, writes
the PNG beside the report and gives the section's Kaplan-Meier part: the
caption, the embedded figure and a note naming the sites without a curve or
not drawn. No Flower, no torch.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from common import wire
from common.atomic import atomic_write_bytes
from server.reporting import plots
from server.reporting.text import safe_text

FIGURES_DIR = "report"  # html.FIGURES_DIR (html.py imports this module via survival)
FIGURE = "km-risk-groups.png"
MAX_KM_PANELS = 8  # site panels of the figure (the pooled one comes on top)
_COLOURS = {"low": "tab:blue", "high": "tab:red"}


def km_figure(
    panels: list[tuple[str, dict[str, tuple[list[float], list[int]]]]],
    edges: Sequence[float],
) -> bytes:
    """Kaplan-Meier step curves per risk group, one panel per site, with the
    number at risk at each interval's start under the panel.

    ``panels`` is ``[(title, {group: (survival at each edge, at risk)})]``.
    """
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"hspace": 0.6})
    starts = [0.0, *edges[:-1]]
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, curves) in zip(axes.flat, panels, strict=False):
        for i, g in enumerate(wire.RISK_GROUPS):
            curve, atrisk = curves.get(g, ([], []))
            if curve:
                xs = [0.0, *edges[: len(curve)]]
                ax.step(xs, [1.0, *curve], where="post", color=_COLOURS[g], label=g)
            # the number at risk: a row per group under the axis label, in
            # points below the axis so that it holds for any panel size
            y, style = -40 - 10 * i, {"fontsize": 7, "color": _COLOURS[g]}
            row = {"xycoords": ax.get_xaxis_transform(), "textcoords": "offset points"}
            ax.annotate(g, (0, 0), (-14, y), ha="right", **row, **style)
            for x, n in zip(starts, atrisk, strict=False):
                ax.annotate(str(n), (x, 0), (0, y), ha="center", **row, **style)
        ax.set_xlim(-0.03 * edges[-1], 1.03 * edges[-1])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks([0.0, *edges])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("days (number at risk below)", fontsize=8)
        ax.set_ylabel("event-free")
        ax.set_title(plots.label(title, 40), fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(
                fontsize=7, title="predicted risk", title_fontsize=7, loc="lower left"
            )
    return plots._png(fig)  # every text plain, as in every report figure


Panel = tuple[str, dict[str, tuple[list[float], list[int]]]]


def _img(run_dir: Path, png: bytes, alt: str) -> str:
    """Embedded as base64 (the page is self-contained) and written beside it,
    as ``html.py`` does with every figure."""
    atomic_write_bytes(Path(run_dir) / FIGURES_DIR / FIGURE, png)
    data = base64.b64encode(png).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"'
        f' data-file="{html.escape(f"{FIGURES_DIR}/{FIGURE}")}"></figure>'
    )


def km_section(
    run_dir: Path,
    panels: list[Panel],
    none: list[str],
    skipped: list[str],
    edges: Sequence[float],
    pooled_km: str,
) -> list[str]:
    """The Kaplan-Meier part of the report's "Prognosis" section.

    Parameters
    ----------
    run_dir : Path
        The run's folder; the figure is written to its report folder.
    panels : list of Panel
        The figure's panels, all sites first (empty: no figure).
    none, skipped : list of str
        The sites without a curve, and those with one but not drawn.
    edges : sequence of float
        The plan's interval edges in days.
    pooled_km : str
        The pooled curves' event-free survival at the last horizon, in words.

    Returns
    -------
    list of str
        HTML: the caption and the embedded figure when there are panels, then
        a note naming the sites without a curve or not drawn.
    """
    out: list[str] = []
    if panels:
        out.append(
            '<p class="note">Kaplan-Meier curves by predicted risk group (each '
            "site's median predicted risk splits its validation patients into low "
            "and high), from the life-table counts the sites released: events per "
            "interval ending at the plan's edges, the number at risk at each "
            "interval's start under each panel. A curve stops where fewer than "
            "the site's floor of patients remain at risk. The all-sites curve "
            "sums the counts released, so past a site's stop it describes the "
            f"other sites only. All sites, {html.escape(pooled_km)}.</p>"
        )
        png = km_figure(panels, edges)
        out.append(_img(run_dir, png, "Kaplan-Meier curves by predicted risk group"))
    notes = []
    if none:
        notes.append(
            "No Kaplan-Meier curve (counts withheld: fewer than the site's floor "
            f"at risk): {_names(none)}"
        )
    if skipped:
        notes.append(
            f"not drawn ({MAX_KM_PANELS} site panels at most): {_names(skipped)}"
        )
    if notes:
        out.append(f'<p class="note">{html.escape("; ".join(notes))}.</p>')
    return out


def _names(sites: list[str], most: int = 20) -> str:
    text = ", ".join(safe_text(s, 64) for s in sites[:most])
    return text + (f" and {len(sites) - most} more" if len(sites) > most else "")
