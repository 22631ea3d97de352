"""Deployment round latency on 127.0.0.1: SuperLink + 2 SuperNodes, small model.

Starts a real ``flower-superlink`` and two hospital SuperNodes (the runbook's
commands via tests/deployment/harness.py; TLS and node authentication on), runs R
rounds of the smallest plan (unet-tiny, 5 phantom cases per site, DP on), and
reports seconds per round (time between consecutive round checkpoints) for
one or more ways a site can run its ClientApps, side by side in one run:

- ``flower``: ``flower-supernode`` in its default subprocess isolation, where
  Flower starts one fresh ``flwr-clientapp`` interpreter per message (the
  development setting, ``governance.require_approval: false``);
- ``gate``: what ``kidneyfl site start`` runs with approval on (the default):
  ``--isolation process`` plus the site's gate executor, each message again a
  fresh interpreter (``federation.warm_clientapp: false``);
- ``gate-warm`` (the default, and the only mode run unless asked): the same
  with the executor's fork server, which imported torch, MONAI and Opacus
  once; each message runs in a child forked from it.

Both sites share this machine, so each has ``cpu_threads: 1`` (as a hospital
sharing a server would set). Where a round goes: each site's own
``timings.jsonl`` gives its loading and work per message; the rest is
messaging: an idle SuperNode asks the SuperLink for work every 3 s
(hard-coded in Flower 1.41), twice per round (train, evaluate), plus the
transfers and the coordinator. kidneyfl sets what it controls: the coordinator
collects replies every 0.2 s (``server/liveness.py``), SuperExecs poll every
0.2 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``), and a model travels as one
packed buffer (``common.packing.pack_arrays``). Also printed: the time a fresh
interpreter takes to import kidneyfl's ClientApp (what the fork server saves
per message).

    .venv/bin/python benchmarks/deploy_latency.py [--rounds 3]
        [--modes gate-warm]   (or any of flower,gate,gate-warm, side by side)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from harness import ROOT, TINY_PLAN, median_time, names, parser, stopwatch, write_json

if TYPE_CHECKING:
    from tests.deployment.harness import Deployment

PLAN = {
    **TINY_PLAN,
    "local-epochs": 1,
    "min-sites": 2,
    "expected-sites": 2,
    "dp-target-epsilon": 30.0,
    "site-wait-timeout": 120.0,
}
MODES = ("flower", "gate", "gate-warm")


def import_time(repeats: int = 3) -> float:
    """Median seconds for a new interpreter to import the ClientApp."""
    return median_time(
        lambda: subprocess.run(
            [sys.executable, "-c", "import client.app"], cwd=ROOT, check=True
        ),
        repeats,
    )


def start_sites(dep: Deployment, mode: str, tmp: Path) -> list[str]:
    """Two hospitals registered and online, their ClientApps run as ``mode``."""
    from client.governance import approve
    from sim.runner import PROJECT_DIR
    from tests.deployment.test_governance_deploy import build_fab

    governed = mode != "flower"
    fab = build_fab(tmp, dep.env, dep.app) if governed else None
    sites = ["hospital-a", "hospital-b"]
    for i, name in enumerate(sites):
        yml = dep.add_site(name, cases=5, seed=i, approval=governed)
        doc = yaml.safe_load(yml.read_text())
        doc["federation"]["warm_clientapp"] = mode == "gate-warm"
        yml.write_text(yaml.safe_dump(doc))
        if fab is not None:
            approve(yml, fab)
        dep.register(name)
    for name in sites:
        if governed:  # what `kidneyfl site start` runs with approval on
            cmd = [sys.executable, "-m", "client.executor", "site"]
            env = dict(dep.env, PYTHONPATH=str(PROJECT_DIR))
            dep._start(f"site-{name}", [*cmd, str(dep.sites[name])], env)
        else:
            dep.start_site(name)
    dep.wait_online(sites)
    return sites


def run_rounds(dep: Deployment, sites: list[str], rounds: int, tmp: Path) -> dict:
    """Submit a run of ``rounds`` rounds, wait for its end, and collect it."""
    from tests.deployment.harness import metrics, wait_for

    out = tmp / "runs"
    with stopwatch() as wall:
        run = dep.submit("latency", out, {**PLAN, "num-server-rounds": rounds})
        wait_for(lambda: run.popen.poll() is not None, 1800, "run end", 1)
    entries = metrics(out / "latency")
    warm = sum(
        dep.procs[f"site-{n}"].text().count("handed to the warm ClientApp")
        for n in sites
    )
    work = site_work([dep.sites[n] for n in sites], entries)
    return {"wall": wall.s, "entries": entries, "warm": warm, "work": work}


def measure(mode: str, rounds: int) -> dict:
    """Seconds per round of a 2-site deployment with the sites run as ``mode``."""
    from tests.deployment.harness import Deployment

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        dep = Deployment(tmp / "deploy")
        try:
            dep.start_superlink()
            sites = start_sites(dep, mode, tmp)
            got = run_rounds(dep, sites, rounds, tmp)
        finally:
            dep.stop_all()
    entries, work = got["entries"], got["work"]
    if len(entries) != rounds or not all(e.get("aggregated") for e in entries):
        raise RuntimeError(f"{mode}: expected {rounds} aggregated rounds: {entries}")
    times = [e["time"] for e in entries]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    per_round = sum(gaps) / len(gaps)
    return {
        "mode": mode,
        "rounds": len(entries),
        "submit_to_end_s": got["wall"],
        "round_gaps_s": gaps,
        "per_round_s": per_round,
        "warm_tasks": got["warm"],
        **work,
        "other_s": per_round - work["train_work_s"] - work["evaluate_work_s"],
    }


def site_work(site_yamls: list[Path], entries: list[dict]) -> dict:
    """Where a round goes, over rounds 2.. (the rounds whose gaps are measured).

    From each site's own ``timings.jsonl`` (end time, loading and work seconds
    per message) and the coordinator's round-end times in ``metrics.jsonl``:
    the slowest site's loading plus work per message kind, and the wall-clock
    gaps between them, averaged: previous round's end to the first site
    starting to train (``to_train_s``), the last train end to the first
    evaluation start (``train_to_evaluate_s``: replies, guard, aggregation,
    the evaluate messages), and the last evaluation end to the round's
    checkpoint (``evaluate_to_end_s``).
    """
    spans: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for yml in site_yamls:
        state = Path(yaml.safe_load(yml.read_text())["state_dir"])
        for line in (state / "timings.jsonl").read_text().splitlines():
            t = json.loads(line)
            start = t["time"] - t["load_s"] - t["work_s"]
            spans.setdefault((int(t["round"]), t["kind"]), []).append(
                (start, t["time"])
            )
    ends = {int(e["round"]): float(e["time"]) for e in entries}
    steady = [r for r in sorted(ends) if r > 1 and r - 1 in ends]
    out: dict[str, float] = {}
    keys = ("train_work_s", "evaluate_work_s", "to_train_s")
    keys += ("train_to_evaluate_s", "evaluate_to_end_s")
    for key in keys:
        out[key] = 0.0
    for r in steady:
        train, ev = spans.get((r, "train"), []), spans.get((r, "evaluate"), [])
        if not train or not ev:
            raise RuntimeError(f"round {r}: no site timings for train or evaluate")
        out["train_work_s"] += max(b - a for a, b in train)
        out["evaluate_work_s"] += max(b - a for a, b in ev)
        out["to_train_s"] += min(a for a, _ in train) - ends[r - 1]
        out["train_to_evaluate_s"] += min(a for a, _ in ev) - max(b for _, b in train)
        out["evaluate_to_end_s"] += ends[r] - max(b for _, b in ev)
    return {k: v / len(steady) for k, v in out.items()}


def print_row(r: dict, base: float | None) -> None:
    """One mode's figures: seconds per round and where a round goes."""
    ratio = f", {r['vs_flower']:.2f}x flower" if base else ""
    print(
        f"{r['mode']:>9}: {r['per_round_s']:.1f} s per round{ratio} "
        f"(target 5); {r['warm_tasks']} of {4 * r['rounds']} messages warm; "
        f"submit to end {r['submit_to_end_s']:.1f} s for {r['rounds']} rounds; "
        f"per round: site work train {r['train_work_s']:.1f} s + evaluate "
        f"{r['evaluate_work_s']:.1f} s, the rest {r['other_s']:.1f} s"
    )
    print(
        f"{'':>9}  timeline: round end -> training starts {r['to_train_s']:.1f} s"
        f", train {r['train_work_s']:.1f} s, -> evaluation starts "
        f"{r['train_to_evaluate_s']:.1f} s, evaluate {r['evaluate_work_s']:.1f} s"
        f", -> round end {r['evaluate_to_end_s']:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", type=names, default="gate-warm")
    ap.add_argument("--import-repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if set(args.modes) - set(MODES) or args.rounds < 2:
        ap.error(f"modes from {MODES} and at least 2 rounds")
    imp = import_time(max(1, args.import_repeats))
    rows = [measure(m, args.rounds) for m in args.modes]
    base = next((r["per_round_s"] for r in rows if r["mode"] == "flower"), None)
    for r in rows:
        r["clientapp_import_s"] = imp
        r["vs_flower"] = r["per_round_s"] / base if base else None
        print_row(r, base)
    print(f"a fresh interpreter imports the ClientApp in {imp:.1f} s")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
