"""A site's case inspections kept in its state_dir (client/tasks/segmentation/cases.py).

A deployed site forks a fresh process for every message; without the kept
inspections each one read every scan of the site again before any work. The
invariants: a later process gets the same cases without reading the scans; a
file that changed in any way is read again (so a scan corrupted after the
first inspection is never trained on); nothing in the kept file, however
damaged, stops the site or makes it skip the inspection of a case.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.tasks.segmentation import cases as site_cases
from common.config import SiteConfig


@pytest.fixture
def site(tiny_site: SiteConfig) -> SiteConfig:
    Path(tiny_site.state_dir).mkdir(parents=True, exist_ok=True)
    return tiny_site


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The images inspect_case opened, in order."""
    opened: list[Path] = []
    real = site_cases.inspect_case

    def counting(image, label, *args, **kwargs):  # noqa: ANN001, ANN202
        opened.append(Path(image))
        return real(image, label, *args, **kwargs)

    monkeypatch.setattr(site_cases, "inspect_case", counting)
    monkeypatch.setattr(site_cases, "_INSPECTED", {})
    return opened


def _new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a freshly forked site process starts with: no inspections."""
    monkeypatch.setattr(site_cases, "_INSPECTED", {})


def _ids(cases: site_cases.SiteCases) -> tuple[list[str], list[str]]:
    return [c.case_id for c in cases.train], [c.case_id for c in cases.validation]


def test_a_later_process_reads_no_scan_and_gets_the_same_split(
    site: SiteConfig, reads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = site_cases.load_site_cases(site)
    assert len(reads) == 6
    assert (Path(site.state_dir) / site_cases.INSPECTED_FILE).is_file()
    _new_process(monkeypatch)
    again = site_cases.load_site_cases(site)
    assert len(reads) == 6  # nothing read again
    assert _ids(again) == _ids(first)
    assert again.skipped == first.skipped


def test_a_scan_changed_after_its_inspection_is_inspected_again(
    site: SiteConfig, reads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = site_cases.load_site_cases(site)
    victim = first.train[0]
    # same size and modification time, different bytes: a truncated stream
    stat = victim.image.stat()
    raw = gzip.compress(b"\0" * 64)
    data = raw[: len(raw) // 2]
    victim.image.write_bytes(data.ljust(stat.st_size, b"\0")[: stat.st_size])
    os.utime(victim.image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.image.stat().st_size == stat.st_size
    _new_process(monkeypatch)
    again = site_cases.load_site_cases(site)
    assert reads.count(victim.image) == 2
    assert victim.case_id in again.skipped
    assert victim.case_id not in _ids(again)[0] + _ids(again)[1]


def test_a_removed_case_leaves_the_kept_file(
    site: SiteConfig, reads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = site_cases.load_site_cases(site)
    gone = first.train[0]
    gone.image.unlink()
    if gone.label is not None:
        gone.label.unlink()
    _new_process(monkeypatch)
    site_cases.load_site_cases(site)
    kept = json.loads((Path(site.state_dir) / site_cases.INSPECTED_FILE).read_text())
    assert len(kept["reports"]) == 5
    assert str(gone.image) not in json.dumps(kept)


_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(junk=_JUNK, mangle_entries=st.booleans())
def test_a_damaged_kept_file_never_stops_the_site_nor_skips_an_inspection(
    site: SiteConfig,
    reads: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    junk: object,
    mangle_entries: bool,
) -> None:
    path = Path(site.state_dir) / site_cases.INSPECTED_FILE
    path.unlink(missing_ok=True)
    _new_process(monkeypatch)
    want = _ids(site_cases.load_site_cases(site))
    kept = json.loads(path.read_text())
    if mangle_entries:  # the right keys, reports replaced by junk
        kept["reports"] = {k: junk for k in kept["reports"]}
        path.write_text(json.dumps(kept))
    else:
        path.write_text(json.dumps(junk))
    _new_process(monkeypatch)
    before = len(reads)
    assert _ids(site_cases.load_site_cases(site)) == want
    assert len(reads) - before == 6  # every case inspected afresh
    assert len(json.loads(path.read_text())["reports"]) == 6  # and kept again
