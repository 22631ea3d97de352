"""The markdown tables of ``benchmarks/utility.py``, from its JSON.

Dice per region is the mean over sites (those whose validation cases contain
the region), then mean ± standard deviation over seeds.
"""

from __future__ import annotations

import math
import statistics

from sim.phantoms import benchmark as bench

REGIONS = ("kidney", "tumour", "cyst")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _site_mean(result: dict, key: str) -> float:
    return _mean([m[key] for m in result["sites"].values() if key in m])


def _cell(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(out: dict) -> str:
    """Markdown: per row, Dice (mean over sites, mean ± SD over seeds),
    false-positive rates, steps and minutes; then Dice per site."""
    head = ["row", *(f"{r} Dice" for r in REGIONS), "tumour FP", "cyst FP"]
    lines = ["| " + " | ".join([*head, "steps", "seeds", "min"]) + " |"]
    lines.append("|" + "---|" * (len(head) + 3))
    for row, by_seed in out["rows"].items():
        res = list(by_seed.values())
        keys = [f"dice-{r}" for r in REGIONS] + ["fp-rate-tumour", "fp-rate-cyst"]
        cells = [_cell([_site_mean(r, k) for r in res]) for k in keys]
        minutes = _mean([r["wall_s"] for r in res]) / 60
        cells += [str(res[0]["steps"]), str(len(res)), f"{minutes:.1f}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + per_site(out) + gain(out) + transfer(out)


def per_site(out: dict) -> str:
    """Markdown: kidney / tumour / cyst Dice per site (mean over seeds)."""
    sites = list(bench.HOSPITALS)
    lines = ["| row | " + " | ".join(f"{s} (k / t / c)" for s in sites) + " |"]
    lines.append("|" + "---|" * (len(sites) + 1))
    for row, by_seed in out["rows"].items():
        cells = []
        for s in sites:
            ms = [r["sites"].get(s, {}) for r in by_seed.values()]
            per = [
                _mean([m[f"dice-{g}"] for m in ms if f"dice-{g}" in m]) for g in REGIONS
            ]
            cells.append(" / ".join("-" if math.isnan(v) else f"{v:.2f}" for v in per))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transfer(out: dict) -> str:
    """Markdown: each site-alone model at its own hospital and at the other
    hospitals (``matrix`` of the local rows), kidney / tumour Dice, mean over
    models and seeds; rows without a matrix (federated, pooled) are left out:
    their one model is already scored at every hospital in the main table."""
    lines = []
    for row, by_seed in out["rows"].items():
        own, other = {g: [] for g in REGIONS[:2]}, {g: [] for g in REGIONS[:2]}
        for r in by_seed.values():
            for trained, at in r.get("matrix", {}).items():
                for site, m in at.items():
                    for g in REGIONS[:2]:
                        if f"dice-{g}" in m:
                            (own if site == trained else other)[g].append(
                                m[f"dice-{g}"]
                            )
        if own["kidney"] and other["kidney"]:
            cells = [
                " / ".join(f"{_mean(d[g]):.3f}" for g in REGIONS[:2])
                for d in (own, other)
            ]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = "| each site's own model (k / t) | at its own hospital | at the others |"
    return "\n\n" + "\n".join([head, "|---|---|---|", *lines])


def gain(out: dict) -> str:
    """Markdown: the federation's gain over its pretrained model per site and
    region (each ``pretrained + ...`` row minus the pretrained row it started
    from, mean over seeds)."""
    rows = out["rows"]
    feds = [
        r
        for r, by_seed in rows.items()
        if "base" in next(iter(by_seed.values())) or r.startswith("pretrained + ")
    ]
    if not feds:
        return ""
    sites = list(bench.HOSPITALS)
    lines = ["\n\n| gain over pretrained (k / t / c) | " + " | ".join(sites) + " |"]
    lines.append("|" + "---|" * (len(sites) + 1))
    for fed in feds:
        by_seed = rows[fed]
        base = next(iter(by_seed.values())).get("base", "pretrained")
        cells = []
        for s in sites:
            per = []
            for g in REGIONS:
                k = f"dice-{g}"
                diffs = [
                    r["sites"][s][k] - rows[base][seed]["sites"][s][k]
                    for seed, r in by_seed.items()
                    if k in r["sites"].get(s, {})
                    and k
                    in rows.get(base, {}).get(seed, {}).get("sites", {}).get(s, {})
                ]
                per.append(f"{_mean(diffs):+.3f}" if diffs else "-")
            cells.append(" / ".join(per))
        lines.append(f"| {fed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_points(out: dict, region: str) -> dict[str, tuple[float, float]]:
    """Row -> (mean, SD over seeds) of the region's Dice (mean over sites)."""
    points = {}
    for row, by_seed in out["rows"].items():
        values = [_site_mean(r, f"dice-{region}") for r in by_seed.values()]
        values = [v for v in values if not math.isnan(v)]
        if values:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            points[row] = (statistics.fmean(values), sd)
    return points


# The plot's curves: (label, row prefix, row suffix, no-DP row, colour). A curve
# is FedAvg with DP at each integer epsilon (``{prefix}{eps}{suffix}``), its
# no-DP row at the right; the accounting row (6.9) is in the table only.
CURVES = (
    ("FedAvg from random weights", "fedavg DP eps=", "", "fedavg", "tab:blue"),
    (
        "FedAvg from the public model (720 steps, lr 0.003)",
        "pretrained (720 steps) + fedavg DP eps=",
        " lr 0.003",
        "pretrained (720 steps) + fedavg (no DP)",
        "tab:red",
    ),
)
# horizontal references: row -> (legend, colour, line style)
REFERENCES = {
    "pooled": ("pooled, no DP (random start)", "k", "-"),
    "pooled DP eps=8": ("pooled, DP eps 8 (random start)", "k", "--"),
    "local": ("each site alone, no DP (random start)", "tab:gray", ":"),
    "pretrained (720 steps)": ("the public model alone", "tab:brown", ":"),
    "pretrained (720 steps) + pooled (no DP)": (
        "pooled from the public model, no DP",
        "tab:purple",
        "-",
    ),
    "pretrained (720 steps) + pooled DP eps=8 lr 0.003": (
        "pooled from the public model, DP eps 8",
        "tab:purple",
        "--",
    ),
}


def curve(pts: dict, prefix: str, suffix: str) -> list[tuple[float, float, float]]:
    """(epsilon, mean, SD) of a curve's rows, by epsilon; integer epsilons only."""
    found = []
    for row, (mean, sd) in pts.items():
        if row.startswith(prefix) and row.endswith(suffix):
            eps = row[len(prefix) : len(row) - len(suffix)]
            try:
                value = float(eps)
            except ValueError:
                continue
            if value % 1 == 0:
                found.append((value, mean, sd))
    return sorted(found)


def plot(out: dict, path) -> None:
    """Dice against epsilon per region: FedAvg with DP at each epsilon (and
    without DP at the right), from random weights and from the public model,
    with pooled, pooled-DP, local and public-model references; error bars are
    the SD over seeds. Written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(REGIONS), figsize=(12, 3.8), sharey=True)
    for ax, region in zip(axes, REGIONS, strict=True):
        pts = curve_points(out, region)
        curves = [(c, curve(pts, c[1], c[2])) for c in CURVES]
        xs = sorted({e for _, found in curves for e, _, _ in found})
        no_dp_x = max(xs) * 2.5 if xs else 1.0
        for (label, _, _, no_dp, colour), found in curves:
            if no_dp in pts:
                found = [*found, (no_dp_x, *pts[no_dp])]
            if found:
                ax.errorbar(
                    [p[0] for p in found],
                    [p[1] for p in found],
                    yerr=[p[2] for p in found],
                    marker="o",
                    capsize=3,
                    color=colour,
                    label=f"{label} (right: no DP)",
                )
        for row, (label, colour, line) in REFERENCES.items():
            if row in pts:
                ax.axhline(pts[row][0], color=colour, linestyle=line, label=label)
        ax.set_xscale("log")
        ax.set_xticks([*xs, no_dp_x], [f"{t:g}" for t in xs] + ["no DP"])
        ax.minorticks_off()
        ax.set_title(f"{region} Dice")
        ax.set_xlabel("epsilon per site (delta 1e-3)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (mean over sites and seeds)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
