"""The report in a real browser: headless Chromium renders it, and the page's
own check (an inline script) records every image that failed to load and any
script error on ``<body>``; ``--dump-dom`` hands back the rendered page.

CI installs Debian's ``chromium`` (``.ci/run``); without one the test skips
and says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from server.reporting.html import write_report
from server.reporting.metrics_log import append_metrics, round_entry
from server.reporting.round_record import RoundRecord
from server.reporting.status import RunStatus

CHROMIUM = next(
    (
        shutil.which(n)
        for n in ("chromium", "chromium-browser", "google-chrome")
        if shutil.which(n)
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (apt-get install chromium); "
    "CI installs it in .ci/run",
)


def _run(tmp: Path, rounds: int, total: int, state: str) -> Path:
    run = tmp / "run"
    for r in range(1, rounds + 1):
        rec = RoundRecord(round=r, aggregated=True)
        for i, site in enumerate(("hospital-a", "hospital-b")):
            score = 0.2 * r + 0.1 * i
            rec.evaluate[site] = {
                "dice-kidney": score,
                "dice-masses": score / 2,
                "dice-tumour": score / 3,
                "eval-loss": 1.0 / r,
                "num-val-cases": 3.0,
            }
            rec.train[site] = {
                "train-loss": 2.0 / r,
                "epsilon": 1.5 * r,
                "delta": 1e-3,
                "dp-enabled": 1.0,
                "num-examples": 6.0,
            }
        append_metrics(run, round_entry(rec))
    status = RunStatus(run, total, rounds)
    status.update(state=state)
    return run


def render(page: Path) -> str:
    """The DOM after Chromium loaded ``page`` (and ran its scripts)."""
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",  # CI runs as root in a container
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _body(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom)
    assert tag, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag.group(1)))


def test_finished_report_renders_every_image_without_errors(tmp_path):
    page = write_report(_run(tmp_path, rounds=3, total=3, state="finished"))
    html = page.read_text()
    n_img = html.count("<img ")
    dom = render(page)
    body = _body(dom)
    assert "errors" not in body, body["errors"]
    assert int(body["loaded-images"]) == n_img >= 4  # dice, loss, epsilon, spread
    assert body["broken-images"] == "0"
    assert "finished: round 3 of 3" in dom and 'http-equiv="refresh"' not in html


def test_live_report_says_where_the_run_is_and_reloads(tmp_path):
    page = write_report(_run(tmp_path, rounds=1, total=10, state="running"))
    dom = render(page)
    assert re.search(r"running: round 1 of 10, updated \d\d:\d\d", dom)
    assert "reloads every" in dom and 'http-equiv="refresh"' in page.read_text()
    assert _body(dom)["broken-images"] == "0"


def test_the_browser_check_sees_a_broken_image(tmp_path):
    # The check itself can fail: a truncated image is reported as broken.
    page = write_report(_run(tmp_path, rounds=2, total=2, state="finished"))
    text = page.read_text()
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    page.write_text(text[:start] + "AAAA" + text[start + 400 :])
    assert _body(render(page))["broken-images"] == "1"
