"""A Ray cluster started ahead of the simulation, for it to join.

Flower's simulation process starts Ray itself (``ray.init`` in its Ray
backend) only after it has imported the ServerApp and the ClientApp, about
6 s after ``kidneyfl simulate`` begins; starting Ray then takes another 3-5 s
before the sites' actors can start. :func:`launch` starts the same cluster
(``ray.init`` with the arguments Flower would pass: the cores, no dashboard)
at the beginning of the run, in a helper process, while the SuperLink, ``flwr
run`` and the simulation process start.

The simulation process finds it without any Flower option: every Flower
process gets ``RAY_TMPDIR`` pointing at a private folder, and the helper
writes the cluster's address to ``$RAY_TMPDIR/ray/ray_current_cluster`` once
the cluster is up, which is where ``ray.init()`` looks for a cluster to join
before starting its own. If the helper is not ready in time or failed, Flower
starts its own Ray in that folder as before; nothing else on the machine can
join this cluster, nor can this run join anyone else's.

Run as ``python -m sim.rayhead NUM_CPUS``: it holds the cluster until its
standard input closes (the runner closes it, or dies), then shuts Ray down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sim.superlink import descendants, terminate

log = logging.getLogger("kidneyfl.simulate")

# unix sockets live under the session folder: keep the prefix short (108 bytes)
_TMP_ROOT = "/tmp" if os.path.isdir("/tmp") else None
ADDRESS_FILE = ("ray", "ray_current_cluster")  # under RAY_TMPDIR, as Ray reads it


@dataclass
class RayHead:
    """The helper process holding a Ray cluster for one simulation."""

    process: subprocess.Popen
    tmpdir: Path
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.tmpdir / "rayhead.log"

    @property
    def address_file(self) -> Path:
        return self.tmpdir.joinpath(*ADDRESS_FILE)

    def ready(self) -> bool:
        """Whether the cluster is up (its address is published)."""
        return self.address_file.is_file()

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the cluster down (the helper's ``ray.shutdown``), then stop
        whatever is left of its process tree by PID."""
        tree = descendants(self.process.pid)
        failed = self.process.poll() not in (None, 0)  # exited before asked to
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()  # the helper's signal to shut down
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        terminate(tree + [p for p in descendants(self.process.pid) if p not in tree])
        if failed:
            log.warning(
                "the run's Ray helper exited early with code %s (if before its "
                "cluster was up, Flower started its own Ray): %s",
                self.process.returncode,
                _tail(self.log),
            )


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "no log"


def ray_tmpdir() -> Path:
    """A new private folder for one simulation's Ray (short: socket paths)."""
    return Path(tempfile.mkdtemp(prefix="kfl-ray-", dir=_TMP_ROOT))


def launch(env: Mapping[str, str], num_cpus: int) -> RayHead:
    """Start the helper; returns at once. ``env`` must hold ``RAY_TMPDIR``
    (the folder the simulation's processes get too)."""
    tmpdir = Path(env["RAY_TMPDIR"])
    head_log = tmpdir / "rayhead.log"
    with open(head_log, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sim.rayhead", str(int(num_cpus))],
            env=dict(env),
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return RayHead(proc, tmpdir)


def _publish(address: str) -> None:
    """Write the address where ``ray.init()`` in this RAY_TMPDIR looks."""
    path = Path(os.environ["RAY_TMPDIR"]).joinpath(*ADDRESS_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text(address)
    os.replace(part, path)  # never half-written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    num_cpus = int(args[0])
    if "RAY_TMPDIR" not in os.environ:
        print("RAY_TMPDIR is not set", file=sys.stderr)
        return 2
    started = time.monotonic()
    import ray

    # What Flower's Ray backend passes (sim.runner's federation config:
    # the cores, ERROR logging; Flower adds include_dashboard=False). This
    # process runs no tasks: its own workers' logs are not needed.
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    address = ray.get_runtime_context().gcs_address
    _publish(address)
    print(f"ray up at {address} in {time.monotonic() - started:.1f} s", flush=True)
    try:
        sys.stdin.read()  # until the runner closes it (or exits)
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(OSError):
            Path(os.environ["RAY_TMPDIR"]).joinpath(*ADDRESS_FILE).unlink()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
