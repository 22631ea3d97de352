"""Does the model work for every group of patients? The fairness table.

Sites that know their patients' subgroups (``client/data/subgroups.py``: sex,
age band, scanner, contrast phase) send each group's Dice, mean squared Dice
and case count, only for groups of at least their floor of patients
(``sg-<attribute>-<value>-<key>``). The coordinator's case-weighted means
(``weighted`` in ``metrics.jsonl``) pool each group over the sites; from the
pooled mean ``m``, mean square ``q`` and count ``n`` of a group, its Dice has
standard error ``sqrt((q - m^2) / (n - 1))`` (patients as independent units).

Per attribute and region, the **gap** is the best group's Dice minus the worst
group's, with a 95 % confidence interval from the two standard errors
(normal approximation: ``gap +- 1.96 sqrt(se_best^2 + se_worst^2)``). A gap
whose interval lies above 0 is reported as found. Groups a site did not
release (fewer patients than its floor there, or none) are named per site: the
coordinator cannot tell the two apart, by design. No Flower, no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from server.reporting.text import safe_text

REGIONS = ("kidney", "tumour")
Z95 = 1.959964
_GROUP = re.compile(r"sg-([a-z]+)-([a-z0-9_]{1,24})-(dice2?|cases)-([a-z]+)")


@dataclass(frozen=True)
class Group:
    """One subgroup's pooled Dice for one region."""

    attribute: str
    value: str
    region: str
    dice: float
    se: float
    cases: int


@dataclass(frozen=True)
class Gap:
    """Best minus worst group of one attribute for one region."""

    attribute: str
    region: str
    best: Group
    worst: Group
    gap: float
    low: float
    high: float

    @property
    def found(self) -> bool:
        """The interval lies above 0: a gap the data support."""
        return self.low > 0


def groups(weighted: dict[str, Any]) -> list[Group]:
    """Every pooled subgroup with a Dice, a count of at least 2 and a finite
    standard error."""
    parts: dict[tuple[str, str, str], dict[str, float]] = {}
    for key, value in weighted.items():
        match = _GROUP.fullmatch(key)
        if match is None or not isinstance(value, int | float):
            continue
        attr, val, kind, region = match.groups()
        parts.setdefault((attr, val, region), {})[kind] = float(value)
    out = []
    for (attr, val, region), p in sorted(parts.items()):
        n, m, q = p.get("cases", 0.0), p.get("dice"), p.get("dice2")
        if m is None or q is None or n < 2 or region not in REGIONS:
            continue
        var = max(q - m * m, 0.0) * n / (n - 1)
        se = math.sqrt(var / n)
        if math.isfinite(se) and math.isfinite(m):
            out.append(Group(attr, val, region, m, se, int(n)))
    return out


def gaps(weighted: dict[str, Any]) -> list[Gap]:
    """The best-worst gap per attribute and region (attributes with at least
    two released groups)."""
    by: dict[tuple[str, str], list[Group]] = {}
    for g in groups(weighted):
        by.setdefault((g.attribute, g.region), []).append(g)
    out = []
    for (attr, region), gs in sorted(by.items()):
        if len(gs) < 2:
            continue
        best = max(gs, key=lambda g: g.dice)
        worst = min(gs, key=lambda g: g.dice)
        gap = best.dice - worst.dice
        half = Z95 * math.sqrt(best.se**2 + worst.se**2)
        out.append(Gap(attr, region, best, worst, gap, gap - half, gap + half))
    return out


def not_released(per_site: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Per site, the groups other sites released and it did not (fewer
    patients than its floor there, or none)."""
    seen: dict[str, set[str]] = {}
    for site, m in per_site.items():
        seen[site] = {
            f"{g[1]} {g[2]}"
            for k in m
            if (g := _GROUP.fullmatch(k)) is not None and g[3] == "cases"
        }
    every = set().union(*seen.values()) if seen else set()
    return {
        site: sorted(every - mine)
        for site, mine in sorted(seen.items())
        if mine and every - mine
    }


def fairness_lines(entry: dict[str, Any]) -> list[str]:
    """Terminal lines: each attribute's gap in tumour and kidney Dice."""
    out = []
    for g in gaps(entry.get("weighted", {})):
        verdict = "a gap" if g.found else "no clear gap"
        out.append(
            f"Subgroups, {g.region} Dice by {safe_text(g.attribute, 16)}: "
            f"{safe_text(g.best.value, 24)} {g.best.dice:.2f} (n={g.best.cases}) vs "
            f"{safe_text(g.worst.value, 24)} {g.worst.dice:.2f} "
            f"(n={g.worst.cases}), gap {g.gap:.2f} (95% CI {g.low:.2f} to "
            f"{g.high:.2f}): {verdict}"
        )
    return out


def fairness_rows(entry: dict[str, Any]) -> list[list[Any]]:
    """Report rows: attribute, region, group, Dice, standard error, cases."""
    return [
        [g.attribute, g.region, g.value, g.dice, g.se, g.cases]
        for g in groups(entry.get("weighted", {}))
    ]
