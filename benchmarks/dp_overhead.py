"""Cost of DP-SGD: a private training step vs a plain one, per registered model.

Prints, for each model in the registry, the median step time and the peak memory
of a DP-SGD step (Opacus, the model's registered grad-sample mode, and the
alternative modes for comparison) relative to a non-private step on the same
batch, measured side by side in this run. Segmentation models get 3D patches
(``--patch``) and voxel-wise cross-entropy over the 4 KiTS labels;
classification models get 2D slices (``--image-size``, the plan's default 64)
and cross-entropy over 4 classes. Ratios matter; absolute times are context
only. Uses CUDA when present. Each measurement is a fresh process; the modes
alternate over ``--rounds`` rounds (plain, DP, plain, DP, ...) so that a change
in the machine's load hits both, and the ratio printed is the median of the
rounds' ratios, with their range.

    .venv/bin/python benchmarks/dp_overhead.py [--batch 8] [--patch 32,32,32]
        [--models unet-tiny,resnet-tiny] [--modes plain,registered] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from harness import int_list, names, parser, write_json

if TYPE_CHECKING:
    from torch import Tensor
    from torch import device as Device
    from torch.nn import Module
    from torch.optim import Optimizer


def _batch(
    model_name: str, batch: int, patch: tuple[int, ...], image_size: int, dev: Device
) -> tuple[Tensor, Tensor]:
    """Random inputs and labels of the model's task: 3D patches with voxel
    labels, or 2D slices with one label each (4 classes)."""
    import torch

    from common.models import get_model_spec

    if get_model_spec(model_name).task == "classification":
        x = torch.randn(batch, 1, image_size, image_size, device=dev)
        return x, torch.randint(0, 4, (batch,), device=dev)
    x = torch.randn(batch, 1, *patch, device=dev)
    return x, torch.randint(0, 4, (batch, *patch), device=dev)


def _private(model: Module, opt: Optimizer, mode: str, batch: int) -> tuple:
    """The model and optimiser of a DP-SGD step in grad-sample ``mode``."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(
        model,
        batch_first=True,
        loss_reduction="mean",
        force_functorch=(mode == "functorch"),
    )
    opt = DPOptimizer(
        opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch
    )
    return model, opt


def _step_times(
    model: Module, opt: Optimizer, xy: tuple[Tensor, Tensor], steps: int, dev: Device
) -> list[float]:
    """Seconds of each of ``steps`` training steps, after 2 warm-up steps."""
    import torch
    from torch import nn

    x, y = xy
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for i in range(steps + 2):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t)
    return times


def _one(
    model_name: str,
    mode: str,
    batch: int,
    patch: tuple[int, ...],
    steps: int,
    image_size: int = 64,
) -> dict:
    """Run in a fresh process: time ``steps`` steps and report peak memory."""
    import resource

    import torch

    from client.train import _empty_step  # noqa: F401  (import cost paid up front)
    from common.models import build_model

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(model_name, out_channels=4).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xy = _batch(model_name, batch, patch, image_size, dev)
    if mode != "plain":
        model, opt = _private(model, opt, mode, batch)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _step_times(model, opt, xy, steps, dev)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"time": statistics.median(times), "peak_mb": peak, "device": dev.type}


def _child(name: str, mode: str, args: argparse.Namespace) -> dict | None:
    """One measurement in a fresh process (None if it failed)."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            f"{name}:{mode}",
            "--batch",
            str(args.batch),
            "--patch",
            args.patch,
            "--steps",
            str(args.steps),
            "--image-size",
            str(args.image_size),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        sys.stderr.write(f"{name} {mode}: {out.stderr.strip()[-300:]}\n")
        return None
    return json.loads(lines[-1])


def _summary(runs: list[dict], plain: list[dict]) -> dict | None:
    """Median time and memory over the rounds, and the median of the rounds'
    ratios to the plain step of the same round."""
    n = min(len(runs), len(plain))
    if n == 0:
        return None
    ratios = [runs[i]["time"] / plain[i]["time"] for i in range(n)]
    mems = [
        runs[i]["peak_mb"] / plain[i]["peak_mb"] if plain[i]["peak_mb"] > 0 else 0.0
        for i in range(n)
    ]
    return {
        "time": statistics.median(r["time"] for r in runs),
        "peak_mb": statistics.median(r["peak_mb"] for r in runs),
        "time_ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "mem_ratio": statistics.median(mems),
        "device": runs[0]["device"],
    }


def _parser() -> argparse.ArgumentParser:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", default="32,32,32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--models", type=names, default="")
    ap.add_argument(
        "--modes",
        type=names,
        default="plain,functorch,hooks",
        help="plain and any of functorch, hooks, registered (the model's own)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="fresh processes per mode, alternating plain and DP; the ratio is "
        "the median of the rounds' ratios",
    )
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    return ap


def _modes(registered: str, asked: list[str]) -> list[str]:
    """Plain first, then the asked DP modes, ``registered`` as the model's own."""
    modes = ["plain"] + [
        registered if m == "registered" else m for m in asked if m != "plain"
    ]
    return list(dict.fromkeys(modes))


def measure_model(name: str, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every mode of one model over the alternating rounds; prints its lines and
    returns its rows and the plain step's summary (None if that failed)."""
    from common.models import MODELS

    registered = MODELS[name].grad_sample_mode
    modes = _modes(registered, args.modes)
    # Rounds alternate the modes (plain, dp, plain, dp, ...) so that a
    # change in the machine's load hits both; each round gives a ratio.
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(max(1, args.rounds)):
        for mode in modes:
            r = _child(name, mode, args)
            if r is not None:
                runs[mode].append(r)
    res = {m: _summary(runs[m], runs["plain"]) for m in modes}
    base = res["plain"]
    rows = []
    for mode, r in res.items():
        if r is None or base is None:
            print(f"{name:<17}{mode:<11} failed")
            continue
        note = "registered" if mode == registered else ""
        spread = (
            f"  (rounds {r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
            if mode != "plain" and len(runs[mode]) > 1
            else ""
        )
        print(
            f"{name:<17}{mode:<11}{r['time']:>9.3f}{r['time_ratio']:>8.2f}"
            f"{r['peak_mb']:>9.0f}{r['mem_ratio']:>7.2f}  {note}{spread}"
        )
        rows.append(
            {
                "model": name,
                "task": MODELS[name].task,
                "mode": mode,
                "registered": mode == registered,
                "step_s": r["time"],
                "time_ratio": r["time_ratio"],
                "time_ratio_range": [r["ratio_min"], r["ratio_max"]],
                "rounds": len(runs[mode]),
                "mem_ratio": r["mem_ratio"],
                "device": r["device"],
            }
        )
    return rows, base


def main(argv: list[str] | None = None) -> int:
    """Measure every registered model, plain vs DP, and print ratios."""
    args = _parser().parse_args(argv)
    patch = tuple(int_list(args.patch))
    if args.child:
        name, mode = args.child.split(":")
        print(
            json.dumps(_one(name, mode, args.batch, patch, args.steps, args.image_size))
        )
        return 0
    from common.models import MODELS

    print(
        f"batch {args.batch}, patch {patch} (3D) / {args.image_size}^2 (2D), "
        f"{args.steps} timed steps (median), {args.rounds} alternating rounds"
    )
    print(
        f"{'model':<17}{'mode':<11}{'step s':>9}{'time x':>8}{'peak MB':>9}"
        f"{'mem x':>7}  note"
    )
    rows, base = [], None
    for name in args.models or sorted(MODELS):
        got, base = measure_model(name, args)
        rows += got
    print("device:", base["device"] if base else "?")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
