"""Every kidneyfl benchmark in one run, with its target, on this machine.

    .venv/bin/python benchmarks/run_all.py [--quick] [--markdown results.md]

Runs each script of this folder in its own process (so imports and memory do
not leak between them), collects their JSON, and prints one table: the figure,
the target from the benchmarks issue, and whether it is met. Ratios are
measured side by side within each script; absolute times are context only.
``--quick`` shrinks the sizes (for a smoke test); the published figures in
docs/benchmarks.md come from a full run. Each benchmark's part of the table
is one function of this module (``BENCHMARKS``, in the table's order).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from harness import ROOT, met, parser, stopwatch

HERE = Path(__file__).resolve().parent
# (benchmark, result, target, met)
Row = tuple[str, str, str, str]


def _run(script: str, args: list[str], out: Path) -> object:
    """Run one benchmark script in its own process; its JSON rows, or None."""
    with stopwatch() as took:
        res = subprocess.run(
            [sys.executable, str(HERE / script), *args, "--json", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    sys.stderr.write(f"  {script}: {took.s:.0f} s\n")
    if res.returncode != 0 or not out.exists():
        sys.stderr.write(res.stdout[-2000:] + res.stderr[-2000:])
        return None
    return json.loads(out.read_text())


def federation_rows(tmp: Path, q: bool) -> list[Row]:
    """1: one site through the simulation vs a plain training loop."""
    fed = _run(
        "federation_overhead.py",
        ["--rounds", "2" if q else "4", "--cases", "12" if q else "40"],
        tmp / "fed.json",
    )
    if not fed:
        return []
    return [
        (
            "1 federation overhead (wall, 1 site)",
            f"{fed['wall_ratio']:.2f}x (steady round "
            f"{fed['steady_round_ratio']:.2f}x, "
            f"{fed['fixed_cost_per_round_s']:.1f} s/round fixed, "
            f"{fed['startup_s']:.0f} s start-up)",
            "< 1.10x",
            met(fed["wall_ratio"] < 1.10),
        )
    ]


def dp_rows(tmp: Path, q: bool) -> list[Row]:
    """2: a DP-SGD step vs a plain one. The target model alternates plain and
    DP over 3 rounds (the machine's load drifts); the reported-only classifier
    gets one."""
    dp = []
    for model, rounds in (("unet-tiny", "3"), ("resnet-tiny", "1")):
        if q and model != "unet-tiny":
            continue
        args = ["--steps", "2" if q else "10", "--rounds", "1" if q else rounds]
        args += ["--models", model, "--modes", "registered"]
        dp += _run("dp_overhead.py", args, tmp / f"dp-{model}.json") or []
    rows = []
    for r in dp:
        if not r["registered"]:
            continue
        default = r["model"] == "unet-tiny"
        low, high = r["time_ratio_range"]
        rows.append(
            (
                f"2 DP-SGD step, {r['model']} ({r['mode']}, {r['device']})",
                f"time {r['time_ratio']:.2f}x (rounds {low:.2f}-{high:.2f}x)"
                f", memory {r['mem_ratio']:.2f}x",
                "time < 2x" if default else "(reported)",
                met(r["time_ratio"] < 2) if default else "-",
            )
        )
    return rows


def aggregation_rows(tmp: Path, q: bool) -> list[Row]:
    """3: the coordinator's aggregation vs a plain numpy mean."""
    args = ["--max-params", "1000000" if q else "30000000"]
    args += ["--repeats", "1" if q else "2"]
    return [
        (
            f"3 aggregation K={r['sites']} P={r['params'] / 1e6:.0f}M",
            f"{r['strategy_over_numpy']:.2f}x numpy "
            f"({r['strategy_gb_per_s']:.2f} GB/s; copy "
            f"{r['copy_gb_per_s']:.2f} GB/s)",
            "< 2x",
            met(r["strategy_over_numpy"] < 2),
        )
        for r in _run("aggregation.py", args, tmp / "agg.json") or []
    ]


def scale_rows(tmp: Path, q: bool) -> list[Row]:
    """4: one simulated round with many sites, and the memory each costs."""
    scale = _run(
        "sim_scale.py", ["--sites", "3,10" if q else "3,10,30,100"], tmp / "scale.json"
    )
    rows = []
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
                met(r["peak_rss_gb"] < 24),
            )
        )
    return rows


def wire_rows(tmp: Path, q: bool) -> list[Row]:
    """5: bytes on the wire per round against the model's float32 size."""
    return [
        (
            f"5 bytes on the wire, {r['model']}",
            f"update {r['update_over_raw']:.3f}x float32 "
            f"({r['train_up'] / 1e6:.2f} MB); no compression offered",
            "<= 1.05x",
            met(r["update_over_raw"] <= 1.05),
        )
        for r in _run("wire_bytes.py", [], tmp / "wire.json") or []
    ]


def latency_rows(tmp: Path, q: bool) -> list[Row]:
    """6: seconds per round of a real 2-site deployment on 127.0.0.1."""
    args = ["--rounds", "2" if q else "3", "--modes", "gate-warm"]
    args += ["--import-repeats", "1"]
    rows = []
    for r in _run("deploy_latency.py", args, tmp / "lat.json") or []:
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
                met(r["per_round_s"] < 5),
            )
        )
    return rows


def demo_rows(tmp: Path, q: bool) -> list[Row]:
    """7: the README's main job (the demo) and where its time goes."""
    args = ["--cases", "20", "--rounds", "2"] if q else []
    e2e = _run("e2e_demo.py", args, tmp / "e2e.json")
    if not e2e:
        return []
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
    return [
        (
            "7 README main job (demo)",
            f"{total / 60:.1f} min: {parts} "
            f"({e2e['sites_in_parallel']:.1f} sites busy at once); kidney Dice "
            f"{e2e['final_kidney_dice']:.3f}, epsilon {e2e['max_epsilon']:.2f}",
            "< 10 min",
            met(total < 600),
        )
    ]


BENCHMARKS: tuple[Callable[[Path, bool], list[Row]], ...] = (
    federation_rows,
    dp_rows,
    aggregation_rows,
    scale_rows,
    wire_rows,
    latency_rows,
    demo_rows,
)


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


def render(rows: list[Row], seconds: float) -> str:
    """The machine, the commit and the markdown table of every figure."""
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"machine: {_machine()}", f"commit: {_commit()}", ""]
    lines.append(f"| {'benchmark':<{width}} | result | target | met |")
    lines.append(f"|{'-' * (width + 2)}|---|---|---|")
    lines += [f"| {a:<{width}} | {b} | {c} | {m} |" for a, b, c, m in rows]
    lines.append("")
    lines.append(f"run_all took {seconds / 60:.1f} min")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, json_out=False)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    with stopwatch() as took, tempfile.TemporaryDirectory() as d:
        rows = [row for bench in BENCHMARKS for row in bench(Path(d), args.quick)]
    text = render(rows, took.s)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
