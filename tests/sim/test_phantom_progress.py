"""Writing phantoms shows its progress (issue 31): a start line, lines with
cases, rate and time left while it runs, and an end line."""

import logging

import pytest

import sim.phantoms.kits_writer as kw
from sim.phantoms.profiles import PROFILES


def test_phantom_writing_says_how_far_it_is(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(kw, "PROGRESS_EVERY_S", 0.0)  # a line per case
    with caplog.at_level(logging.INFO, logger="kidneyfl.progress"):
        kw.write_site(tmp_path / "x", PROFILES["standard-nephro"], 3, seed=1, scale=8.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "kidneyfl.progress"]
    assert lines[0] == "writing 3 phantom cases for x (standard-nephro)"
    assert any("1/3" in x and "cases/s" in x and "left" in x for x in lines)
    assert lines[-1].startswith("phantom cases for x (standard-nephro): 3 written")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kidneyfl.progress"):  # all kept
        kw.write_site(tmp_path / "x", PROFILES["standard-nephro"], 3, seed=1, scale=8.0)
    assert not [r for r in caplog.records if r.name == "kidneyfl.progress"]


@pytest.mark.parametrize("total", [0])
def test_nothing_to_write_says_nothing(total, caplog):
    with caplog.at_level(logging.INFO, logger="kidneyfl.progress"):
        kw._Progress(total, "x")(0)
    assert not caplog.records
