"""The report's figures: which metrics to plot, and every PNG of the report.

Built from ``metrics.jsonl`` entries, the run's ``plan.json`` (class names),
``comparison.json`` (local/pooled baselines, when present) and sample slices a
simulation passes in; drawn by ``server/reporting/plots.py``. No Flower here.

What is drawn is bounded whatever the sites sent (:func:`drawn_entries`): at
most :data:`MAX_SITES_DRAWN` sites and :data:`MAX_SITE_KEYS` metrics per site,
:data:`MAX_KEYS_DRAWN` score panels, :data:`MAX_CONFUSION_SITES` confusion
matrices, each no larger than the plan's classes. A reply with thousands of
keys or a federation of impostor names costs the report no more than an
honest round; the HTML says what was left out, ``metrics.jsonl`` keeps it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from common import wire
from server.reporting import plots

COMPARISON_FILE = "comparison.json"
MAX_SITES_DRAWN = 16  # lines per panel, rows of the final table
MAX_SITE_KEYS = 512  # metrics kept per site and round (20 classes' cm-i-j)
# Score panels, spread lines, final-table columns: every score of a
# segmentation run, or of a classification run with up to 9 classes.
MAX_KEYS_DRAWN = 12
MAX_CONFUSION_SITES = 8  # per-site confusion matrices (all sites: one more)
MAX_CLASSES = 64  # confusion matrix rows and columns, whatever the plan says
_CM_KEY = re.compile(r"^cm-([a-z0-9_]+)-([a-z0-9_]+)$")
_COUNTS = {wire.NUM_VAL_CASES, wire.NUM_EXAMPLES, wire.REFUSED, wire.METRICS_WITHHELD}
# Section of the report -> [(PNG file name, PNG bytes)]
Figures = dict[str, list[tuple[str, bytes]]]


def drawn_entries(entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """``entries`` cut to what the report draws, and how many sites were left out.

    The first :data:`MAX_SITES_DRAWN` sites by name (over the whole run) keep
    their per-site parts (train, evaluate, epsilon), each with its first
    :data:`MAX_SITE_KEYS` metrics; refusals, the weighted means and the spread
    stay as recorded (they are over all sites).
    """
    sites = sorted(
        {s for e in entries for part in ("train", "evaluate") for s in e.get(part, {})}
    )
    keep = set(sites[:MAX_SITES_DRAWN])
    out = []
    for e in entries:
        cut = dict(e)
        for part in ("train", "evaluate"):
            cut[part] = {
                site: dict(itertools.islice(m.items(), MAX_SITE_KEYS))
                for site, m in e.get(part, {}).items()
                if site in keep
            }
        cut["epsilon"] = {s: v for s, v in e.get("epsilon", {}).items() if s in keep}
        out.append(cut)
    return out, max(len(sites) - MAX_SITES_DRAWN, 0)


def score_keys(entries: list[dict[str, Any]]) -> list[str]:
    """Evaluation metrics that are scores (not counts, losses or matrices), in a
    stable order: Dice, surface Dice, then the rest alphabetically."""
    keys = {
        k
        for e in entries
        for m in e.get("evaluate", {}).values()
        for k in m
        if k not in _COUNTS
        and k != wire.EVAL_LOSS
        and not _CM_KEY.match(k)
        and not k.startswith("cases-")  # how many cases a figure describes
        and not k.startswith("fp-ml-")  # a volume in mL, not a score
    }

    def order(k: str) -> tuple[int, str]:
        if k.startswith(wire.SURFACE_DICE_PREFIX):
            return (1, k)
        return (0 if k.startswith(wire.DICE_PREFIX) else 2, k)

    return sorted(keys, key=order)


def confusion_matrices(
    entry: dict[str, Any], class_names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """``{site: counts}`` from ``cm-<true>-<pred>`` metrics, plus ``all sites``.

    Classes are named (``cm-cyst-stone``, in ``class_names`` order) or numbered.
    A site sends every cell of a row or none: a row it withheld (fewer patients
    of that class than its floor, ``client.disclosure``) is NaN, drawn blank,
    and adds nothing to ``all sites`` (NaN only where no site sent the cell).

    With ``class_names`` (the plan's) every matrix is exactly that many classes
    square: a key naming another class, or a number past the last, is
    ignored, so no site can index outside the matrix or grow it. Without them
    (a run folder with no plan) numbered classes below :data:`MAX_CLASSES`
    count. Counts that are not finite numbers are ignored too.
    """
    names = list(class_names or [])[:MAX_CLASSES]
    index = {str(n): i for i, n in enumerate(names)}
    limit = len(names) if names else MAX_CLASSES

    def idx(token: str) -> int | None:
        if token.isdigit() and len(token) <= 3:
            return int(token) if int(token) < limit else None
        return index.get(token)

    out: dict[str, np.ndarray] = {}
    for site, m in sorted(entry.get("evaluate", {}).items()):
        cells = {
            (i, j): float(v)
            for k, v in m.items()
            if (g := _CM_KEY.match(k))
            and isinstance(v, int | float)
            and math.isfinite(v)
            and (i := idx(g[1])) is not None
            and (j := idx(g[2])) is not None
        }
        if not cells:
            continue
        n = len(names) or max(max(i, j) for i, j in cells) + 1
        mat = np.zeros((n, n))
        for (i, j), v in cells.items():
            mat[i, j] = v
        sent = {i for i, _ in cells}
        mat[[i for i in range(n) if i not in sent]] = np.nan  # withheld rows
        out[site] = mat
    if len(out) > 1:
        n = max(m.shape[0] for m in out.values())
        total = np.full((n, n), np.nan)
        for m in out.values():
            part = total[: m.shape[0], : m.shape[1]]
            fill = np.isfinite(m)
            part[fill] = np.nan_to_num(part[fill]) + m[fill]
        out["all sites"] = total
    return out


def report_figures(
    run_dir: Path, entries: list[dict[str, Any]], plan: dict[str, Any], samples: list
) -> Figures:
    """Every figure of the report, by section (a section without data has none).

    ``entries`` are what the report draws (:func:`drawn_entries`); at most
    :data:`MAX_KEYS_DRAWN` scores are drawn.
    """
    keys = score_keys(entries)[:MAX_KEYS_DRAWN]
    figs: Figures = {"curves": _curves(entries, keys)}
    figs["loss"] = [("loss.png", plots.loss_curves(entries))]
    if any(v is not None for e in entries for v in e.get("epsilon", {}).values()):
        figs["privacy"] = [("epsilon.png", plots.epsilon_curves(entries))]
    if keys and len({s for e in entries for s in e.get("evaluate", {})}) > 1:
        figs["spread"] = [("spread.png", plots.spread_curves(entries, keys))]
    comp = run_dir / COMPARISON_FILE
    if comp.is_file():
        figs["comparison"] = [("comparison.png", comparison_heatmap(comp))]
    names = plan.get("class-names")
    confusion = _confusion(
        entries[-1], names if isinstance(names, list | tuple) else None
    )
    if confusion:
        figs["confusion"] = confusion
    if samples:
        figs["samples"] = _samples(samples)
    return figs


def _curves(entries: list[dict[str, Any]], keys: list[str]) -> list[tuple[str, bytes]]:
    """Per-site curves: Dice, surface Dice, then every other score."""
    dice = [k for k in keys if k.startswith(wire.DICE_PREFIX)]
    surface = [k for k in keys if k.startswith(wire.SURFACE_DICE_PREFIX)]
    rest = [
        k
        for k in keys
        if not k.startswith((wire.DICE_PREFIX, wire.SURFACE_DICE_PREFIX))
    ]
    groups = [
        ("dice.png", "Dice", dice),
        ("surface-dice.png", "Surface Dice", surface),
        ("metrics.png", "Validation metrics", rest),
    ]
    return [
        (name, plots.metric_curves(entries, ks, title))
        for name, title, ks in groups
        if ks
    ]


def _confusion(
    entry: dict[str, Any], names: list | tuple | None
) -> list[tuple[str, bytes]]:
    """One heat map per site with confusion counts, and one for all sites."""
    cms = confusion_matrices(entry, list(names) if names is not None else None)
    shown = [s for s in cms if s != "all sites"][:MAX_CONFUSION_SITES]
    shown += ["all sites"] if "all sites" in cms else []
    out = []
    for i, (site, mat) in enumerate((s, cms[s]) for s in shown):
        labels = (
            list(names)[: mat.shape[0]]
            if names is not None and len(names) >= mat.shape[0]
            else [str(k) for k in range(mat.shape[0])]
        )
        png = plots.heatmap(
            mat,
            labels,
            labels,
            f"confusion: {site}",
            "predicted",
            "true",
            ".0f",
            "Blues",
        )
        out.append((f"confusion-{i}.png", png))
    return out


def _samples(samples: list) -> list[tuple[str, bytes]]:
    """The simulation's sample slices (phantom data only)."""
    return [
        (
            f"sample-{i}.png",
            plots.sample_slice(
                s.image,
                s.truth,
                s.pred,
                f"{s.site} (phantom): red = model"
                + (", green = reference" if s.truth is not None else ""),
            ),
        )
        for i, s in enumerate(samples)
    ]


def comparison_heatmap(path: Path) -> bytes:
    """Model x site heat map of ``comparison.json``'s headline metric."""
    comp = json.loads(path.read_text())
    metric = str(comp["metric"])
    models = list(comp["models"])[:MAX_SITES_DRAWN]
    sites = list(comp["sites"])[:MAX_SITES_DRAWN]
    values = comp["values"]

    def value(m: str, s: str) -> float:
        v = values.get(m, {}).get(s, {}).get(metric)
        return float(v) if isinstance(v, int | float) and v else math.nan

    mat = np.array([[value(m, s) for s in sites] for m in models])
    return plots.heatmap(mat, models, sites, f"{metric}: model x site", "site", "model")
