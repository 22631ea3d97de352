"""Simulation start-up: seconds from the start of a run to its first round, the
old way (``KIDNEYFL_FAST_START=0``) and the fast start, side by side.

Each run is a tiny simulation (2 phantom sites of 4 cases, 1 round of 1 local
epoch, the tests' smallest segmentation plan, DP on as in the tests) in a
fresh process; the two ways alternate (old, fast, old, fast, ...) so that a
machine whose speed drifts treats them alike. Every run gets new site state
(ledger, audit log) over the same phantom cases. For each run:

- ``sent``: the coordinator pushes the first round's train requests
  (``status.json``: the round's start);
- ``arrived``: the first site's ClientApp receives one (the site's audit log,
  written when a request arrives, before any work);
- ``round``: round 1 is in ``metrics.jsonl`` (includes the sites' first-round
  work: DP calibration, loading, training, evaluation);
- ``stop``: from round 1's metrics line to the end of the run (the final
  model and report, stopping Flower and Ray, the report's sample slices);
- ``total``: the whole run;

all from ``simulate()`` being called (``--cli``: from starting ``kidneyfl
simulate``, its imports included), with the median and the spread (min-max)
per way. ``--phases`` also prints when each process of the run first appeared
(SuperLink, ``flwr run``, the simulation process, Ray, the sites' actors),
median over the runs.

    .venv/bin/python benchmarks/startup.py [--runs 3] [--cli] [--phases]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from harness import ROOT, TINY_PLAN, parser, phantom_site, write_json

PLAN = {
    **TINY_PLAN,
    "num-server-rounds": 1,
    "local-epochs": 1,
    "min-sites": 2,
}
SITES = ("site-a", "site-b")
WAYS = {"old": "0", "fast": "1"}
MARKS = ("sent", "arrived", "round", "stop", "total")
# a process of the run, by what its command line holds: (label, needle)
PROCESSES = (
    ("superlink", "flower-superlink"),
    ("ray helper", "sim.rayhead"),
    ("superexec", "flower-superexec"),
    ("flwr run", "bin/flwr run"),
    ("simulation", "flwr-simulation"),
    ("ray gcs", "gcs_server"),
    ("raylet", "raylet/raylet"),
    ("ray python", "dashboard.py"),  # + monitor, log monitor, the two agents
    ("ray python", "monitor.py"),
    ("ray python", "ray::DashboardAgent"),
    ("ray python", "ray::RuntimeEnvAgent"),
    ("worker", "ray::IDLE"),  # a Ray worker before it hosts an actor
    ("actor", "ray::ClientAppActor"),
)


# -- one run (in its own process) ----------------------------------------------------


class Watch:
    """Polls ``status.json`` (and with ``processes`` the run's process tree)
    every 0.1 s: when the coordinator started and when it sent the first train
    requests (both written in the file), when each kind of process first
    appeared."""

    def __init__(self, root_pid: int, run_dir: Path, processes: bool) -> None:
        self.root_pid = root_pid if processes else None
        self.run_dir = run_dir
        self.first: dict[str, float] = {}
        self.cpu: dict[int, tuple[str, float]] = {}  # pid: (label, CPU seconds)
        self.status: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        from sim.superlink import descendants

        while not self._stop.wait(0.1):
            now = time.time()
            for pid in descendants(self.root_pid) if self.root_pid else []:
                try:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                cmd = raw.replace(b"\0", b" ").decode(errors="replace")
                for label, needle in sorted(PROCESSES, key=_actor_first):
                    if needle in cmd:
                        self.first.setdefault(label, now)
                        self.cpu[pid] = (label, cpu_seconds(pid, self.cpu.get(pid)))
                        break
            try:
                s = json.loads((self.run_dir / "status.json").read_text())
            except (OSError, ValueError):
                continue
            if s.get("started"):
                self.status.setdefault("serverapp", float(s["started"]))
            if s.get("phase") == "training" and s.get("round_started"):
                self.status.setdefault("sent", float(s["round_started"]))


def _actor_first(p: tuple[str, str]) -> bool:
    return p[0] != "actor"  # a worker hosting an actor counts as the actor


def cpu_seconds(pid: int, last: tuple[str, float] | None) -> float:
    """CPU seconds (user and system) ``pid`` has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return last[1] if last else 0.0


def first_train_arrival(state_dirs: list[Path]) -> float | None:
    """When the first site's audit log recorded a train request's arrival."""
    times = []
    for d in state_dirs:
        path = d / "audit-log.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if e["message_type"] == "train" and e["decision"] == "arrived":
                times.append(datetime.fromisoformat(e["time"]).timestamp())
    return min(times) if times else None


def one_run(work: Path, data: Path, cli: bool, phases: bool) -> dict:
    """One simulation of the phantom sites under ``work``; the marks in
    seconds from its start (``simulate()`` called, or ``kidneyfl`` started)."""
    import yaml

    sites = [
        phantom_site(work, n, cases=4, seed=i, generate=False, data_root=data / n)
        for i, n in enumerate(SITES)
    ]
    state = [Path(yaml.safe_load(p.read_text())["state_dir"]) for p in sites]
    out, name = work / "runs", "startup"
    run_dir = out / name
    if cli:
        cmd = [str(Path(sys.executable).parent / "kidneyfl"), "simulate"]
        cmd += ["--sites", ",".join(map(str, sites)), "--run-name", name]
        cmd += ["--out-dir", str(out), "--flwr-home", str(work / "flwr-home")]
        for k, v in PLAN.items():
            cmd += ["--set", f"{k}={v}"]
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=ROOT)
        with Watch(proc.pid, run_dir, phases) as watch:
            if proc.wait() != 0:
                raise SystemExit(f"kidneyfl simulate failed ({proc.returncode})")
    else:
        from sim.runner import simulate

        t0 = time.time()
        with Watch(os.getpid(), run_dir, phases) as watch:
            simulate(
                sites,
                name,
                out_dir=out,
                overrides=PLAN,
                flwr_home=work / "flwr-home",
                stream=False,
            )
    end = time.time()
    metrics = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    round_done = float(metrics[0]["time"])
    arrived = first_train_arrival(state)
    marks = {
        "sent": watch.status.get("sent"),
        "arrived": arrived,
        "round": round_done,
        "total": end,
    }
    row = {k: (v - t0 if v is not None else None) for k, v in marks.items()}
    row["stop"] = end - round_done
    row["serverapp"] = watch.status["serverapp"] - t0 if watch.status else None
    row["processes"] = {k: v - t0 for k, v in watch.first.items()}
    cpu: dict[str, float] = {}
    for label, seconds in watch.cpu.values():
        cpu[label] = cpu.get(label, 0.0) + seconds
    row["cpu"] = cpu
    # one Ray cluster per run (two would mean Flower did not join the helper's)
    row["ray_clusters"] = sum(
        1 for label, _ in watch.cpu.values() if label == "ray gcs"
    )
    return row


# -- the comparison ------------------------------------------------------------------


def spread(values: list[float]) -> str:
    """``median (min-max)`` of ``values``."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return "-"
    return f"{statistics.median(vals):5.1f} ({vals[0]:.1f}-{vals[-1]:.1f})"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--runs", type=int, default=3, help="runs per way (default 3)")
    ap.add_argument("--ways", default="old,fast", help="old,fast (default both)")
    ap.add_argument("--cli", action="store_true", help="time `kidneyfl simulate`")
    ap.add_argument("--phases", action="store_true", help="when each process began")
    ap.add_argument(
        "--one", nargs=3, metavar=("WORK", "DATA", "OUT"), help="(internal)"
    )
    args = ap.parse_args(argv)
    if args.one:  # a child: one run, its row as JSON
        work, data, out = (Path(p) for p in args.one)
        row = one_run(work, data, args.cli, args.phases)
        Path(out).write_text(json.dumps(row))
        return 0

    ways = [w for w in args.ways.split(",") if w]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        base = Path(tmp)
        (base / "gen").mkdir()
        for i, n in enumerate(SITES):  # the phantom cases, written once
            phantom_site(base / "gen", n, cases=4, seed=i, data_root=base / "data" / n)
        for r in range(args.runs):
            for way in ways:
                work = base / f"{way}-{r}"
                work.mkdir()
                cmd = [sys.executable, __file__, "--one", str(work), str(base / "data")]
                cmd += [str(work / "row.json")] + (["--cli"] if args.cli else [])
                cmd += ["--phases"] if args.phases else []
                env = dict(os.environ, **{"KIDNEYFL_FAST_START": WAYS[way]})
                load = load_average()
                subprocess.run(cmd, env=env, check=True, cwd=ROOT)
                row = json.loads((work / "row.json").read_text())
                row.update(way=way, run=r + 1, load_before=load)
                rows.append(row)
                print(
                    f"{way:5s} run {r + 1}: "
                    + "  ".join(
                        f"{k} {row[k]:.1f}" for k in MARKS if row[k] is not None
                    )
                    + f"  (load {load})",
                    flush=True,
                )
    start = "`kidneyfl simulate` started" if args.cli else "simulate() called"
    print(f"\nseconds from {start}, median (min-max) of {args.runs} runs per way")
    print(f"{'':6s}" + "".join(f"{k:>18s}" for k in MARKS))
    for way in ways:
        mine = [r for r in rows if r["way"] == way]
        print(
            f"{way:6s}" + "".join(f"{spread([r[k] for r in mine]):>18s}" for k in MARKS)
        )
    if args.phases:
        labels = list(dict.fromkeys(p for p, _ in PROCESSES)) + ["serverapp"]
        print("\nfirst seen, median seconds (and CPU seconds over the run)")
        print(f"{'':12s}" + "".join(f"{w:>16s}" for w in ways))
        for label in labels:
            cells = []
            for way in ways:
                vals = [
                    r["serverapp"]
                    if label == "serverapp"
                    else r["processes"].get(label)
                    for r in rows
                    if r["way"] == way
                ]
                vals = [v for v in vals if v is not None]
                cpus = [r["cpu"].get(label) for r in rows if r["way"] == way]
                cpus = [c for c in cpus if c is not None]
                seen = f"{statistics.median(vals):.1f}" if vals else "-"
                used = f"({statistics.median(cpus):.1f})" if cpus else ""
                cells.append(f"{seen + ' ' + used:>16s}")
            print(f"{label:12s}" + "".join(cells))
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
