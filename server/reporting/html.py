"""The run report: ``runs/<run>/report.html`` and its PNGs in ``runs/<run>/report/``.

The HTML is self-contained (every image embedded as base64, no external
script, no CDN), so it opens offline and can be mailed to the consortium. It is
built from what the coordinator already holds: ``metrics.jsonl``, ``plan.json``,
``status.json``, ``comparison.json`` (local/pooled baselines, when present) and
sample slices rendered from phantom data only (see ``sim/samples.py``).

The coordinator rewrites it after every round. While the run goes on the page
says so ("round 3 of 10, updated 12:04") and reloads itself every
:data:`REFRESH_S` seconds; once the run has finished, stopped or failed it
stops reloading. One small inline script marks, on the page itself, any image
that failed to load and any script error (``data-broken-images``,
``data-errors`` on ``<body>``), which the browser test reads.

Site names, metric keys and refusal reasons are the sites' own text. They
arrive cleaned (``metrics.jsonl`` is read through ``metrics_log.safe_entry``:
no control characters or escape codes, bounded lengths) and every string this
module writes into the page, cleaned or not, is HTML-escaped here
(``html.escape``, quotes included); nothing a site sent becomes markup.
What is drawn is bounded (``figures.drawn_entries``, :data:`MAX_EVENT_ROWS`).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from common import wire
from common.atomic import atomic_write_bytes
from server.reporting.clinical import clinical_html
from server.reporting.figures import (
    MAX_KEYS_DRAWN,
    MAX_SITES_DRAWN,
    drawn_entries,
    report_figures,
    score_keys,
)
from server.reporting.metrics_log import last_known_privacy, read_metrics, site_privacy
from server.reporting.status import LIVE_STATES, REPORT_NOTE, read_status, status_line
from server.reporting.survival import survival_html

log = logging.getLogger("kidneyfl.server")

REPORT_NAME = "report.html"
FIGURES_DIR = "report"
REFRESH_S = 20
MAX_EVENT_ROWS = 200  # refusals, rejections and failures listed (the latest)
# Records load failures and script errors on <body> for anyone (or any test)
# that reads the rendered page; it fetches nothing.
_CHECK_JS = """
window.addEventListener("error", function (e) {
  document.body.dataset.errors = (document.body.dataset.errors || "") +
    (e.message || "error") + ";";
});
window.addEventListener("load", function () {
  var broken = 0, loaded = 0;
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (im.complete && im.naturalWidth > 0) { loaded++; } else { broken++; }
  }
  document.body.dataset.loadedImages = loaded;
  document.body.dataset.brokenImages = broken;
});
"""

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}
th{background:#f0f0f0} td:first-child,th:first-child{text-align:left}
img{max-width:100%;margin:.3em 0} .note{color:#555;font-size:13px}
.status{padding:.5em 1em;border-radius:4px;background:#eef5ff}
.status.live{background:#fff6d6}
figure{display:inline-block;margin:.5em}
"""


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"'
        f' data-file="{html.escape(name)}"></figure>'
    )


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if not math.isfinite(v) else f"{v:.4g}"
        if isinstance(v, list | dict):
            return html.escape(json.dumps(v))
        return html.escape("-" if v is None else str(v))

    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)]
    out[0] += "</tr>"
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>")
    return "\n".join(out) + "</table>"


def _final_table(entries: list[dict[str, Any]], keys: list[str]) -> str:
    last = entries[-1]
    head = ["site", *keys, wire.EVAL_LOSS, "val cases", "epsilon", "delta"]
    rows = []
    # a site silent in the last round shows the epsilon it last reported
    known = last_known_privacy(entries[:-1])
    sites = sorted(
        set(last.get("evaluate", {})) | set(last.get("train", {})) | set(known)
    )
    for site in sites:
        m = last.get("evaluate", {}).get(site, {})
        p = site_privacy(last, site, known)
        eps: Any = p.epsilon if p.dp and p.epsilon is not None else p.epsilon_text()
        if p.note:
            eps = f"{p.epsilon_text(3)} ({p.note_text()})"
        rows.append(
            [site, *(m.get(k) for k in keys), m.get(wire.EVAL_LOSS)]
            + [m.get(wire.NUM_VAL_CASES), eps, p.delta]
        )
    w, sp = last.get("weighted", {}), last.get("spread", {})
    rows.append(["weighted mean", *(w.get(k) for k in keys), w.get(wire.EVAL_LOSS)])
    rows.append(["best-worst", *(sp.get(k) for k in keys)])
    return _table(head, rows)


def _events_table(entries: list[dict[str, Any]]) -> str:
    rows = []
    for e in entries:
        for kind in ("refused", "rejected", "failed"):
            for site, why in e.get(kind, {}).items():
                rows.append([e["round"], site, kind, why])
    if not rows:
        return '<p class="note">No refusals, rejected updates or failures.</p>'
    note = ""
    if len(rows) > MAX_EVENT_ROWS:
        note = (
            f'<p class="note">The latest {MAX_EVENT_ROWS} of {len(rows)} events; '
            "metrics.jsonl holds them all.</p>"
        )
    return note + _table(["round", "site", "event", "reason"], rows[-MAX_EVENT_ROWS:])


_SECTIONS = [
    (
        "curves",
        "Per-site validation curves",
        "One line per site and the case-weighted mean, every round.",
    ),
    (
        "loss",
        "Loss",
        "Training loss reported by each site after its local epochs; validation "
        "loss on its validation split.",
    ),
    (
        "privacy",
        "Privacy",
        "Cumulative epsilon per site at the site's own delta, as each site "
        "reported it: the PRV accountant (Opacus), computed by each site over its "
        "whole ledger. A site without a reply in a round keeps the epsilon it "
        "last reported.",
    ),
    ("spread", "Best-worst site spread", "Best minus worst site, per metric, round."),
    (
        "comparison",
        "Federated vs local vs pooled",
        "Each model evaluated on each site's validation split (comparison.json).",
    ),
    (
        "confusion",
        "Confusion matrices",
        "Last round; rows are the true class, columns the predicted class.",
    ),
    (
        "samples",
        "Sample slices (phantom data only)",
        "Rendered only for simulated sites whose data are synthetic phantoms; a "
        "real site's images never reach the coordinator or this report.",
    ),
]


def write_report(
    run_dir: Path, samples: list | None = None, skipped_samples: list[str] | None = None
) -> Path:
    """Write ``report.html`` and the PNGs; returns the HTML path.

    Raises
    ------
    FileNotFoundError
        If the run has no completed round.
    """
    run_dir = Path(run_dir)
    entries = read_metrics(run_dir)
    status = read_status(run_dir)
    if not entries and not status:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl with rounds")
    plan_path = run_dir / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    live = status.get("state") in LIVE_STATES
    head = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if live else ""
    body = [
        f"<h1>kidneyfl run {html.escape(run_dir.name)}</h1>",
        _status_note(status, live),
        f'<p class="note">{len(entries)} round(s); generated '
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} from metrics.jsonl.</p>",
    ]
    if entries:
        body += _body(run_dir, entries, plan, samples or [], skipped_samples)
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        + head
        + f"<title>kidneyfl {html.escape(run_dir.name)}</title><style>{_CSS}</style>"
        + f"<script>{_CHECK_JS}</script></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    out = run_dir / REPORT_NAME
    atomic_write_bytes(out, page.encode())
    log.debug("report: %s", out)
    return out


def _status_note(status: dict[str, Any], live: bool) -> str:
    if not status:
        return ""
    # this page is the report: a note that it was not drawn is out of date
    text = status_line({k: v for k, v in status.items() if k != REPORT_NOTE})
    if live:
        text += f"; this page reloads every {REFRESH_S} s while the run goes on"
    cls = "status live" if live else "status"
    return f'<p class="{cls}" id="status">{html.escape(text)}</p>'


def _body(
    run_dir: Path,
    entries: list[dict[str, Any]],
    plan: dict[str, Any],
    samples: list,
    skipped_samples: list[str] | None,
) -> list[str]:
    all_entries = entries
    entries, sites_left_out = drawn_entries(entries)
    figs = report_figures(run_dir, entries, plan, samples)
    fig_dir = run_dir / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):
        old.unlink()
    keys = score_keys(entries)
    body = [
        '<h2 id="final">Final numbers (last round)</h2>',
        _final_table(entries, keys[:MAX_KEYS_DRAWN]),
    ]
    if sites_left_out or len(keys) > MAX_KEYS_DRAWN:
        body.append(
            f'<p class="note">Drawn: the first {MAX_SITES_DRAWN} sites by name '
            f"({sites_left_out} more) and {MAX_KEYS_DRAWN} metrics "
            f"({max(len(keys) - MAX_KEYS_DRAWN, 0)} more); metrics.jsonl holds "
            "them all.</p>"
        )
    body += clinical_html(run_dir, entries)
    body.append(survival_html(run_dir, entries))
    for key, title, note in _SECTIONS:
        items = figs.get(key)
        if not items:
            continue
        body.append(f'<h2 id="{key}">{html.escape(title)}</h2>')
        body.append(f'<p class="note">{html.escape(note)}</p>')
        for name, png in items:
            atomic_write_bytes(fig_dir / name, png)
            body.append(_img(f"{FIGURES_DIR}/{name}", png, f"{title}: {name}"))
    if skipped_samples:
        body.append(
            '<p class="note">No sample slice for '
            + html.escape(", ".join(skipped_samples))
            + ": not phantom data.</p>"
        )
    audit_path = run_dir / "privacy-audit.json"  # kidneyfl simulate --audit-canaries
    if audit_path.is_file():
        audit = json.loads(audit_path.read_text())
        keys = ["mode", "site", "canaries", "included", "correct", "guesses", "auc"]
        keys += ["epsilon_lb", "confidence", "delta", "accountant_epsilon"]
        body.append('<h2 id="privacy-audit">Privacy audit</h2>')
        body.append(
            '<p class="note">One-run canary audit (docs/privacy-audit.md): a lower '
            "bound on epsilon next to the accountant's epsilon. A bound of 0 is not "
            "a proof of privacy; a bound above the accountant's epsilon means the "
            "DP implementation is broken.</p>"
        )
        body.append(_table(keys, [[audit.get(k) for k in keys]]))
    body.append(_events_table(all_entries))
    body.append('<h2 id="plan">Plan</h2>')
    body.append(_table(["key", "value"], [[k, plan[k]] for k in sorted(plan)]))
    return body
