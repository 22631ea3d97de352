"""The Ray cluster a simulation starts ahead of Flower (sim/rayhead.py)."""

import os
import time

import pytest

from sim import rayhead
from sim.runner import _federation_config, _flower_env
from sim.superlink import alive, descendants


def test_helper_publishes_its_cluster_and_stops_it(tmp_path):
    tmp = rayhead.ray_tmpdir()
    try:
        env = _flower_env(tmp_path, fast=True, ray_tmp=tmp)
        head = rayhead.launch(env, 1)
        deadline = time.monotonic() + 60
        while not head.ready() and time.monotonic() < deadline:
            assert head.process.poll() is None, head.log.read_text()
            time.sleep(0.1)
        address = head.address_file.read_text()
        assert address.startswith(("127.0.0.1:", "192.")) or ":" in address
        # what ray.init() in a Flower process with this environment finds
        from ray._private.services import get_ray_address_from_environment

        old = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(tmp)
        try:
            assert get_ray_address_from_environment(None, None) == address
        finally:
            if old is None:
                del os.environ["RAY_TMPDIR"]
            else:
                os.environ["RAY_TMPDIR"] = old
        tree = descendants(head.process.pid)
        assert tree  # gcs_server, raylet, ...
        head.stop()
        assert head.process.returncode == 0
        assert not any(alive(p) for p in tree)
        assert not head.ready()
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def test_flower_env_gives_ray_its_own_folder_only_when_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_prestart_worker_first_driver", raising=False)
    plain = _flower_env(tmp_path)
    assert "RAY_prestart_worker_first_driver" not in plain
    assert plain.get("RAY_TMPDIR") == os.environ.get("RAY_TMPDIR")
    fast = _flower_env(tmp_path, fast=True, ray_tmp=tmp_path / "r")
    assert fast["RAY_TMPDIR"] == str(tmp_path / "r")
    assert fast["RAY_prestart_worker_first_driver"] == "0"
    monkeypatch.setenv("RAY_enable_metrics_collection", "1")  # the operator wins
    assert _flower_env(tmp_path, fast=True)["RAY_enable_metrics_collection"] == "1"


@pytest.mark.parametrize("head", [False, True])
def test_a_driver_joining_the_cluster_passes_no_cpus(head):
    cfg = _federation_config(2, None, ray_head=head)
    assert ("init-args-num-cpus" in cfg) is not head
    assert "num-supernodes=2" in cfg and 'init-args-logging-level="ERROR"' in cfg
