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
    lines = ["| " + " | ".join([*head, "steps", "min"]) + " |"]
    lines.append("|" + "---|" * (len(head) + 2))
    for row, by_seed in out["rows"].items():
        res = list(by_seed.values())
        keys = [f"dice-{r}" for r in REGIONS] + ["fp-rate-tumour", "fp-rate-cyst"]
        cells = [_cell([_site_mean(r, k) for r in res]) for k in keys]
        minutes = _mean([r["wall_s"] for r in res]) / 60
        cells += [str(res[0]["steps"]), f"{minutes:.1f}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + per_site(out) + gain(out)


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


def gain(out: dict) -> str:
    """Markdown: the federation's gain over the pretrained model per site
    (pretrained + FedAvg DP minus pretrained, mean over seeds)."""
    rows = out["rows"]
    fed = next((r for r in rows if r.startswith("pretrained + ")), None)
    if "pretrained" not in rows or fed is None:
        return ""
    lines = ["\n\n| gain over pretrained | " + " | ".join(REGIONS) + " |"]
    lines.append("|" + "---|" * (len(REGIONS) + 1))
    for s in bench.HOSPITALS:
        cells = []
        for g in REGIONS:
            diffs = [
                rows[fed][seed]["sites"][s][f"dice-{g}"] - pre["sites"][s][f"dice-{g}"]
                for seed, pre in rows["pretrained"].items()
                if f"dice-{g}" in pre["sites"][s]
                and f"dice-{g}" in rows[fed].get(seed, {}).get("sites", {}).get(s, {})
            ]
            cells.append(f"{_mean(diffs):+.3f}" if diffs else "-")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
