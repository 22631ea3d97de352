"""Every kidneyfl benchmark in one run, with its target, on this machine.

    .venv/bin/python benchmarks/run_all.py [--quick] [--markdown results.md]

Runs each script of this folder in its own process (so imports and memory do
not leak between them), collects their JSON, and prints one table: the figure,
the target from the benchmarks issue, and whether it is met. Ratios are
measured side by side within each script; absolute times are context only.
``--quick`` shrinks the sizes (for a smoke test); the published figures in
docs/benchmarks.md come from a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _run(script: str, args: list[str], out: Path) -> object:
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, str(HERE / script), *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    sys.stderr.write(f"  {script}: {time.perf_counter() - t0:.0f} s\n")
    if res.returncode != 0 or not out.exists():
        sys.stderr.write(res.stdout[-2000:] + res.stderr[-2000:])
        return None
    return json.loads(out.read_text())


def _machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{dev}, Python {platform.python_version()}, torch {torch.__version__}"
    )


def _git(*args: str) -> str:
    res = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return res.stdout.strip()


def _commit() -> str:
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return (_git("rev-parse", "--short", "HEAD") or "unknown") + (
        " (modified)" if dirty else ""
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    q = args.quick
    started = time.perf_counter()
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        fed = _run(
            "federation_overhead.py",
            ["--rounds", "2" if q else "4", "--cases", "12" if q else "40"],
            tmp / "fed.json",
        )
        if fed:
            rows.append(
                (
                    "1 federation overhead (wall, 1 site)",
                    f"{fed['wall_ratio']:.2f}x (steady round "
                    f"{fed['steady_round_ratio']:.2f}x, "
                    f"{fed['fixed_cost_per_round_s']:.1f} s/round fixed, "
                    f"{fed['startup_s']:.0f} s start-up)",
                    "< 1.10x",
                    "yes" if fed["wall_ratio"] < 1.10 else "no",
                )
            )
        # The target model alternates plain and DP over 3 rounds (the machine's
        # load drifts); the reported-only classifier gets one.
        dp = []
        for model, rounds in (("unet-tiny", "3"), ("resnet-tiny", "1")):
            if q and model != "unet-tiny":
                continue
            got = _run(
                "dp_overhead.py",
                [
                    "--steps",
                    "2" if q else "10",
                    "--rounds",
                    "1" if q else rounds,
                    "--models",
                    model,
                    "--modes",
                    "registered",
                ],
                tmp / f"dp-{model}.json",
            )
            dp += got or []
        for r in dp or []:
            if r["registered"]:
                default = r["model"] == "unet-tiny"
                rows.append(
                    (
                        f"2 DP-SGD step, {r['model']} ({r['mode']}, {r['device']})",
                        f"time {r['time_ratio']:.2f}x (rounds "
                        f"{r['time_ratio_range'][0]:.2f}-{r['time_ratio_range'][1]:.2f}x)"
                        f", memory {r['mem_ratio']:.2f}x",
                        "time < 2x" if default else "(reported)",
                        ("yes" if r["time_ratio"] < 2 else "no") if default else "-",
                    )
                )
        agg = _run(
            "aggregation.py",
            [
                "--max-params",
                "1000000" if q else "30000000",
                "--repeats",
                "1" if q else "2",
            ],
            tmp / "agg.json",
        )
        for r in agg or []:
            rows.append(
                (
                    f"3 aggregation K={r['sites']} P={r['params'] / 1e6:.0f}M",
                    f"{r['strategy_over_numpy']:.2f}x numpy "
                    f"({r['strategy_gb_per_s']:.2f} GB/s; copy "
                    f"{r['copy_gb_per_s']:.2f} GB/s)",
                    "< 2x",
                    "yes" if r["strategy_over_numpy"] < 2 else "no",
                )
            )
        scale = _run(
            "sim_scale.py",
            ["--sites", "3,10" if q else "3,10,30,100"],
            tmp / "scale.json",
        )
        first = (scale or [None])[0]
        for r in scale or []:
            extra = r["sites"] - first["sites"]
            marginal = (
                f"; {(r['peak_rss_gb'] - first['peak_rss_gb']) * 1e3 / extra:.1f} MB "
                f"per site beyond {first['sites']}"
                if extra
                else ""
            )
            rows.append(
                (
                    f"4 simulation, {r['sites']} sites, 1 round, "
                    f"{r['cpus_per_site']} CPU/site",
                    f"{r['wall_s']:.0f} s, peak {r['peak_rss_gb']:.2f} GB "
                    f"({r['per_site_mb']:.0f} MB/site{marginal})",
                    "100 sites in 24 GB",
                    "yes" if r["peak_rss_gb"] < 24 else "no",
                )
            )
        wire = _run("wire_bytes.py", [], tmp / "wire.json")
        for r in wire or []:
            rows.append(
                (
                    f"5 bytes on the wire, {r['model']}",
                    f"update {r['update_over_raw']:.3f}x float32 "
                    f"({r['train_up'] / 1e6:.2f} MB); no compression offered",
                    "<= 1.05x",
                    "yes" if r["update_over_raw"] <= 1.05 else "no",
                )
            )
        lat = _run(
            "deploy_latency.py",
            [
                "--rounds",
                "2" if q else "3",
                "--modes",
                "gate-warm",
                "--import-repeats",
                "1",
            ],
            tmp / "lat.json",
        )
        for r in lat or []:
            rows.append(
                (
                    f"6 deployment round, 2 sites, {r['mode']}",
                    f"{r['per_round_s']:.1f} s/round: round end -> train "
                    f"{r['to_train_s']:.1f} s, train {r['train_work_s']:.1f} s, "
                    f"-> evaluate {r['train_to_evaluate_s']:.1f} s, evaluate "
                    f"{r['evaluate_work_s']:.1f} s, -> round end "
                    f"{r['evaluate_to_end_s']:.1f} s"
                    + (f" ({r['vs_flower']:.2f}x flower)" if r["vs_flower"] else "")
                    + f"; fresh ClientApp import {r['clientapp_import_s']:.1f} s",
                    "< 5 s",
                    "yes" if r["per_round_s"] < 5 else "no",
                )
            )
        e2e = _run(
            "e2e_demo.py",
            ["--cases", "20", "--rounds", "2"] if q else [],
            tmp / "e2e.json",
        )
        if e2e:
            total = e2e["total_s"]
            parts = ", ".join(
                f"{name} {e2e[key]:.0f} s"
                for name, key in (
                    ("phantoms", "phantoms_s"),
                    ("loading", "data_loading_s"),
                    ("training", "training_s"),
                    ("evaluation", "evaluation_s"),
                    ("coordinator+Flower", "coordinator_and_flower_s"),
                )
            )
            rows.append(
                (
                    "7 README main job (demo)",
                    f"{total / 60:.1f} min: {parts} "
                    f"({e2e['sites_in_parallel']:.1f} sites busy at once); kidney Dice "
                    f"{e2e['final_kidney_dice']:.3f}, epsilon {e2e['max_epsilon']:.2f}",
                    "< 10 min",
                    "yes" if total < 600 else "no",
                )
            )
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"machine: {_machine()}", f"commit: {_commit()}", ""]
    lines.append(f"| {'benchmark':<{width}} | result | target | met |")
    lines.append(f"|{'-' * (width + 2)}|---|---|---|")
    lines += [f"| {a:<{width}} | {b} | {c} | {m} |" for a, b, c, m in rows]
    lines.append("")
    lines.append(f"run_all took {(time.perf_counter() - started) / 60:.1f} min")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
