"""What a clinician reads of a run: lesion-level detection, the post-processing
the federation chose, the out-of-distribution threshold and the model's
provenance (issue 28; docs/evaluation.md, docs/clinical-outputs.md).

Read from the run's own files: the last round of ``metrics.jsonl`` (lesion
metrics per site and case-weighted) and ``clinical.json``
(``server/clinical_round.py``). No Flower, no torch.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from server.reporting.fairness import fairness_lines, fairness_rows, gaps, not_released
from server.reporting.text import safe_text

CLINICAL_FILE = "clinical.json"
REGION = "tumour"
# Lesion-level metrics of the tumour, as (key, column title).
LESION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("lesion-sens-tumour", "lesion sensitivity"),
    ("fp-lesions-tumour", "FP lesions / case"),
    ("detect-sens-tumour", "case sensitivity"),
    ("detect-spec-tumour", "case specificity"),
    ("detect-auc-tumour", "case AUC"),
    ("froc-tumour", "FROC"),
    ("fp-rate-tumour", "tumour FP rate"),
    ("dice-tumour", "tumour Dice"),
)


def read_clinical(run_dir: Path) -> dict[str, Any] | None:
    """``clinical.json`` of a run, or None when absent or unreadable."""
    path = Path(run_dir) / CLINICAL_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _num(v: Any, digits: int = 2) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return "-"
    return f"{v:.{digits}f}"


def lesion_line(weighted: dict[str, Any]) -> str | None:
    """The federated lesion-level line of a round (None without lesion metrics)."""
    if "lesion-sens-tumour" not in weighted:
        return None
    return (
        f"tumour lesions: {_num(weighted.get('lesion-sens-tumour'))} found, "
        f"{_num(weighted.get('fp-lesions-tumour'))} false-positive lesions per case; "
        f"case detection sensitivity {_num(weighted.get('detect-sens-tumour'))}, "
        f"specificity {_num(weighted.get('detect-spec-tumour'))}, "
        f"AUC {_num(weighted.get('detect-auc-tumour'))}; "
        f"FROC {_num(weighted.get('froc-tumour'))}"
    )


def _change(before: dict[str, Any], after: dict[str, Any], key: str) -> str:
    return f"{_num(before.get(key))} -> {_num(after.get(key))}"


def clinical_lines(run_dir: Path, entries: list[dict[str, Any]]) -> list[str]:
    """Terminal lines after a run's summary table."""
    lines = []
    if entries and (line := lesion_line(entries[-1].get("weighted", {}))):
        lines.append(f"Last round, {line}")
    if entries:
        lines += fairness_lines(entries[-1])
    data = read_clinical(run_dir) or {}
    pp = data.get("postprocess")
    if isinstance(pp, dict):
        before, after = pp.get("before") or {}, pp.get("after") or {}
        lines.append(
            f"Post-processing chosen by the federation: "
            f"{safe_text(pp.get('rule'), 120)}; tumour FP rate "
            f"{_change(before, after, 'fp-rate-tumour')}, lesion sensitivity "
            f"{_change(before, after, 'lesion-sens-tumour')}, FP lesions per case "
            f"{_change(before, after, 'fp-lesions-tumour')}, tumour Dice "
            f"{_change(before, after, 'dice-tumour')}, kidney Dice "
            f"{_change(before, after, 'dice-kidney')}"
        )
    ood = data.get("ood-reference")
    if isinstance(ood, dict):
        lines.append(
            f"'Unlike the training data' threshold: {_num(ood.get('threshold'))} "
            f"({_num(100 * ood.get('false-alarm-rate', math.nan), 1)}% of "
            f"{ood.get('calibrated-on', '?')} held-out validation scans above it)"
        )
    prov = data.get("training-data")
    if isinstance(prov, dict) and prov.get("synthetic-only"):
        lines.append(
            "Provenance: trained on synthetic phantoms only: not for real scans "
            "(kidneyfl predict says so on every scan)"
        )
    return lines


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return html.escape(_num(v, 3))
    return html.escape("-" if v is None else safe_text(v, 120))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    out = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
    out += "</tr>"
    for row in rows:
        out += "<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
    return out + "</table>"


def clinical_html(run_dir: Path, entries: list[dict[str, Any]]) -> list[str]:
    """The report's section: lesion level per site, the post-processing
    candidates and the chosen rule, the OOD threshold, the provenance."""
    if not entries:
        return []
    last = entries[-1]
    per_site = last.get("evaluate", {})
    weighted = last.get("weighted", {})
    if "lesion-sens-tumour" not in weighted and read_clinical(run_dir) is None:
        return []
    keys = [k for k, _ in LESION_COLUMNS]
    rows = [[s, *(m.get(k) for k in keys)] for s, m in sorted(per_site.items())]
    rows.append(["weighted mean", *(weighted.get(k) for k in keys)])
    body = [
        '<h2 id="lesions">Lesions (last round)</h2>',
        '<p class="note">Tumours as a clinician counts them: connected components; '
        "a reference lesion is found when predicted tumour covers at least 10% of "
        "it; a predicted component touching no reference tumour is a false "
        "positive. Case sensitivity and specificity: 'this kidney has a tumour'. "
        "Each site's numbers are released only over at least its floor of "
        "patients (docs/evaluation.md).</p>",
        _table(["site", *(t for _, t in LESION_COLUMNS)], rows),
    ]
    data = read_clinical(run_dir) or {}
    table = data.get("candidates")
    if isinstance(table, dict) and table:
        chosen = (data.get("postprocess") or {}).get("rule")
        cols = ["dice-kidney", "dice-tumour", "fp-rate-tumour"]
        cols += ["lesion-sens-tumour", "fp-lesions-tumour"]
        body.append(
            '<h2 id="postprocessing">Post-processing chosen by the federation</h2>'
        )
        body.append(
            '<p class="note">Every candidate rule evaluated at every site on its '
            "validation patients after the last round; federated means "
            "(case-weighted). The rule chosen (docs/clinical-outputs.md) is stored "
            "in the final model and applied by kidneyfl predict. Chosen: "
            f"<b>{html.escape(safe_text(chosen, 120))}</b>.</p>"
        )
        rows = [
            [("* " if rule == chosen else "") + str(rule), *(m.get(c) for c in cols)]
            for rule, m in table.items()
            if isinstance(m, dict)
        ]
        body.append(_table(["rule", *cols], rows))
    for line in clinical_lines(run_dir, [])[0:]:
        body.append(f'<p class="note">{html.escape(line)}</p>')
    return body + fairness_html(last)


def fairness_html(last: dict[str, Any]) -> list[str]:
    """The fairness table: each subgroup's pooled Dice, the best-worst gap per
    attribute with its 95 % interval, and what each site did not release."""
    rows = fairness_rows(last)
    if not rows:
        return []
    body = [
        '<h2 id="subgroups">Subgroups</h2>',
        '<p class="note">Dice per group of patients, pooled over the sites that '
        "released the group (each site only for groups of at least its floor of "
        "patients); standard error from the pooled mean square "
        "(docs/evaluation.md).</p>",
        _table(["attribute", "region", "group", "Dice", "std. error", "cases"], rows),
    ]
    gap_rows = [
        [g.attribute, g.region, f"{g.best.value} - {g.worst.value}", g.gap]
        + [f"{g.low:.3f} to {g.high:.3f}", "yes" if g.found else "no"]
        for g in gaps(last.get("weighted", {}))
    ]
    if gap_rows:
        head = ["attribute", "region", "best - worst", "gap", "95% CI", "gap found"]
        body.append(_table(head, gap_rows))
    missing = not_released(last.get("evaluate", {}))
    if missing:
        body.append(
            '<p class="note">Not released (fewer patients than the site\'s floor '
            "there, or none): "
            + html.escape("; ".join(f"{s}: {', '.join(g)}" for s, g in missing.items()))
            + "</p>"
        )
    return body
