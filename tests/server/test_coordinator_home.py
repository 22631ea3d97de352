"""The coordinator's commands find Flower's home, or say what to export."""

from __future__ import annotations

import subprocess
import sys

from server.deploy import write_connection
from server.reporting.site_status import (
    ListingError,
    list_supernodes,
    missing_connection,
)


def test_a_missing_connection_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("FLWR_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "operator"))
    why = missing_connection("consortium")
    assert str(tmp_path / "operator" / ".flwr" / "config.toml") in why
    assert "default Flower home" in why and "export FLWR_HOME" in why
    # written where flwr looks by default: found with no variable set
    write_connection(
        tmp_path / "operator" / ".flwr", "consortium", "127.0.0.1:9093", insecure=True
    )
    assert missing_connection("consortium") == ""
    # kept elsewhere: found only with FLWR_HOME
    other = tmp_path / "srv"
    write_connection(other, "lab", "127.0.0.1:9093", insecure=True)
    assert "lab" in missing_connection("lab")
    assert missing_connection("lab", str(other)) == ""
    try:
        list_supernodes("lab", flwr_bin="/bin/false")
    except ListingError as err:  # flwr failed: the file and the fix are named
        assert "export FLWR_HOME" in str(err)
    else:
        raise AssertionError("a missing connection must be refused")


def test_connect_says_what_to_export(tmp_path):
    base = [sys.executable, "-m", "cli.main", "coordinator", "connect", "c"]
    base += ["--address", "127.0.0.1:9093", "--insecure"]
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(base, env=env, capture_output=True, text=True, check=True)
    assert "no variable set" in res.stdout
    home = tmp_path / "elsewhere"
    res = subprocess.run(
        [*base, "--flwr-home", str(home)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"export FLWR_HOME={home}" in res.stdout


def test_status_shows_when_each_site_was_last_seen_online_or_went_offline():
    from server.reporting.site_status import format_rows, site_rows

    nodes = [
        {
            "node-id": "11",
            "status": "online",
            "online-at": "2026-12-07T09:01:02.5+00:00",
        },
        {"node-id": "12", "status": "offline", "offline-at": "2026-12-07T09:05:00Z"},
        {"node-id": "13", "status": "registered"},
    ]
    names = {"11": "hospital-a", "12": "hospital-b", "13": "hospital-c"}
    rows = {r["site"]: r["superlink"] for r in site_rows(nodes, [], names)}
    assert rows == {
        "hospital-a": "online since 2026-12-07 09:01:02",
        "hospital-b": "offline since 2026-12-07 09:05:00",
        "hospital-c": "registered",
    }
    assert "offline since 2026-12-07 09:05:00" in format_rows(
        site_rows(nodes, [], names)
    )
