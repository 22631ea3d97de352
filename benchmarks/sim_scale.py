"""Simulation scale: one round with 3, 10, 30 and 100 phantom sites.

Runs ``kidneyfl simulate`` (SuperLink, Flower's Ray simulation engine, one
ClientApp actor per ``--cpus-per-site`` CPUs; by default simulate's own share,
one per site on 2 cores) for one round of DP training on N tiny phantom
sites (evaluation off), and reports wall time and peak memory: the peak of the
summed resident memory of every process the run starts (sampled every 0.5 s
from /proc), and that peak divided by N; ``run_all`` adds the memory each
site beyond the first size costs.

    .venv/bin/python benchmarks/sim_scale.py [--sites 3,10,30,100]
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import TINY_PLAN, int_list, parser, phantom_site, stopwatch, write_json

PLAN = {
    **TINY_PLAN,
    "local-epochs": 1,
    "min-sites": 2,
    "dp-target-epsilon": 30.0,
    # Train only: the figure is what N sites cost the engine (time, memory);
    # evaluation would add ~0.2 s per site and nothing to that.
    "fraction-evaluate": 0.0,
}


def _rss_tree(pid: int) -> int:
    from sim.superlink import descendants

    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def measure(n: int, tmp: Path, cpus_per_site: int | None = None) -> dict:
    """Wall time and peak memory of a one-round simulation of ``n`` sites."""
    from sim.runner import default_cpus_per_site, simulate

    sites = [phantom_site(tmp, f"site-{i:03d}", cases=3, seed=i % 5) for i in range(n)]
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_tree(os.getpid()))
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        with stopwatch() as wall:
            simulate(
                sites,
                f"scale-{n}",
                out_dir=tmp / "runs",
                overrides={**PLAN, "num-server-rounds": 1},
                flwr_home=tmp / "flwr-home",
                cpus_per_site=cpus_per_site,
                stream=False,
            )
    finally:
        stop.set()
        thread.join()
    if cpus_per_site is None:
        cpus_per_site = default_cpus_per_site(n, os.cpu_count() or 2)
    return {
        "sites": n,
        "cpus_per_site": cpus_per_site,
        "wall_s": wall.s,
        "peak_rss_gb": peak / 1e9,
        "per_site_mb": peak / n / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--sites", type=int_list, default="3,10,30,100")
    ap.add_argument(
        "--cpus-per-site",
        type=int,
        default=None,
        help="CPUs per virtual site (Ray actor); default: kidneyfl simulate's",
    )
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in args.sites:
            rows.append(measure(n, Path(d) / f"n{n}", args.cpus_per_site))
            r = rows[-1]
            print(
                f"{n:>4} sites: {r['wall_s']:7.1f} s, peak {r['peak_rss_gb']:.2f} GB "
                f"({r['per_site_mb']:.0f} MB per site)",
                flush=True,
            )
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
