"""A GPU plan at KiTS scale: step times, memory, throughput, and a run's time and cost.

For a plan preset (default ``sites/plan-gpu-kits.toml``; ``--plan FILE``,
``--set KEY=VALUE`` on top) this builds the plan's model and a synthetic
batch of the plan's patch size (random tensors: no data needed) and measures,
on the device present:

- a plain training step and a DP-SGD step, each through ``client.train``'s
  ``local_train`` (the site's optimiser, the task's loss, Opacus wrapped by
  ``client.privacy.dpsgd.make_private`` in the model's registered grad-sample
  mode, noise calibrated for the plan's whole run): median of ``--steps``
  steps after ``--warmup`` excluded ones, with the range, and their ratio;
- peak GPU memory of each (``torch.cuda.max_memory_allocated``), and of one
  DP step at the largest Poisson batch the run should see (DP batches are
  random and nothing caps them: that batch must fit too);
- throughput in patients per second (one patch per patient per step), and from
  it the estimated time of a federated round (patients per site x local epochs
  / throughput, plus the deployment round floor measured in
  docs/benchmarks.md), of the run, and its cost at ``--gpu-hourly-usd`` (an
  input, not a fact) with one GPU per site.

On a machine without CUDA the patch and batch are scaled down
(``SMOKE_PATCH``, ``SMOKE_BATCH``) and every figure is labelled a CPU smoke
run (one torch thread by default, ``--cpu-threads``): it checks the code
path, not the preset.

    .venv/bin/python benchmarks/gpu_plan.py [--plan FILE] [--set KEY=VALUE]
        [--sites 3] [--patients-per-site 200] [--gpu-hourly-usd 2.5]
        [--steps 10] [--warmup 3] [--require-cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness import ROOT, Column, parser, table, write_json

if TYPE_CHECKING:
    import torch
    from torch.utils.data import TensorDataset

    from client.privacy.dpsgd import DPSpec
    from common.config import Plan

PRESET = ROOT / "sites" / "plan-gpu-kits.toml"
# docs/benchmarks.md, item 6: a deployment round took 13.2 s, of which 1.0 s
# was training and 0.4 s evaluation; the other 11.8 s are Flower's polls and
# the hand-offs between coordinator and sites, paid whatever the model.
ROUND_FLOOR_S = 11.8
SMOKE_PATCH = "32,32,32"
SMOKE_BATCH = 2
SMOKE_LABEL = "CPU smoke run, not the preset's figures"
SCALED_LABEL = "scaled-down run (--scale-down), not the preset's figures"
# A run should see a larger Poisson batch than the bound with at most this chance.
BATCH_RISK = 0.01
MIB = 2**20


# -- the plan ------------------------------------------------------------------------


def app_defaults() -> dict:
    """``[tool.flwr.app.config]`` of pyproject.toml: the keys every plan starts from."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def parse_sets(items: list[str]) -> dict[str, object]:
    """``["batch-size=4", "model=unet"]`` -> a dict, values read as TOML where
    they parse and as bare strings where not (as ``kidneyfl simulate --set``)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def load_preset(path: Path, sets: dict[str, object] | None = None) -> Plan:
    """The plan ``{**defaults, **preset, **sets}``, validated.

    Raises
    ------
    common.config.ConfigError
        Naming the file, the key and the fix.
    """
    from common.config import load_plan

    with open(path, "rb") as fh:
        preset = tomllib.load(fh)
    return load_plan({**app_defaults(), **preset, **(sets or {})}, source=str(path))


def scaled_down(plan: Plan) -> Plan:
    """The plan with the smoke run's patch and batch (same model, same DP)."""
    from common.config import Plan

    keys = plan.model_dump(by_alias=True)
    return Plan.model_validate(
        {**keys, "patch-size": SMOKE_PATCH, "batch-size": SMOKE_BATCH}
    )


# -- the privacy schedule ------------------------------------------------------------


def batch_bound(patients: int, batch: int, total_steps: int) -> int:
    """The Poisson batch a run of ``total_steps`` exceeds with at most
    ``BATCH_RISK`` chance (a union bound over the steps).

    Each patient joins a step with probability ``q = 1 / ceil(patients /
    batch)`` (Opacus' rate, ``poisson_schedule``), so a step's batch is
    Binomial(patients, q).
    """
    from client.privacy.accounting import poisson_schedule

    q, _ = poisson_schedule(patients, batch)
    if q >= 1.0:
        return patients

    def log_pmf(k: int) -> float:
        return (
            math.lgamma(patients + 1)
            - math.lgamma(k + 1)
            - math.lgamma(patients - k + 1)
            + k * math.log(q)
            + (patients - k) * math.log1p(-q)
        )

    tail = 0.0  # P(batch > b), summed down from the top
    for b in range(patients, -1, -1):
        if total_steps * (tail + math.exp(log_pmf(b))) > BATCH_RISK:
            return b
        tail += math.exp(log_pmf(b))
    return 0


def schedule(
    plan: Plan, patients: int, delta: float, noise: float | None = None
) -> dict:
    """Sample rate, steps and the noise multiplier a site calibrates for the run
    (``noise`` instead, where given: the step's cost does not depend on it, and
    calibrating takes seconds)."""
    from client.privacy.accounting import calibrate_noise, poisson_schedule

    q, per_epoch = poisson_schedule(patients, plan.batch_size)
    total = plan.num_server_rounds * plan.local_epochs * per_epoch
    calibrated = noise is None
    if noise is None:
        noise = calibrate_noise(plan.dp_target_epsilon, delta, q, total)
    return {
        "sample_rate": q,
        "steps_per_epoch": per_epoch,
        "steps_per_site": total,
        "noise_multiplier": noise,
        "noise_calibrated": calibrated,
        "batch_bound": batch_bound(patients, plan.batch_size, total),
    }


# -- measurement ---------------------------------------------------------------------


def measure(
    plan: Plan,
    dev: torch.device,
    batch: int,
    dp: DPSpec | None,
    steps: int,
    warmup: int,
) -> dict:
    """Time ``warmup + steps`` training steps of ``batch`` random patches.

    Each step is one epoch over a dataset of exactly ``batch`` patients: the
    plain loader gives them all, and under DP the Poisson rate is 1, so every
    step has the whole batch. Returns the step times after the warm-up and the
    peak GPU memory (None on the CPU).
    """
    import torch
    from torch.utils.data import TensorDataset

    shape = (batch, 1, *plan.patch_size)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(shape, generator=gen),
        torch.randint(0, 4, shape, generator=gen),  # the 4 KiTS labels, as long
    )
    ticks = [time.perf_counter()]

    def tick(_step: int, _loss: float) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ticks.append(time.perf_counter())

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings():
        # the input patch needs no gradient; torch says so on every DP step
        warnings.filterwarnings("ignore", "Full backward hook", UserWarning)
        _train(plan, dev, data, batch, dp, warmup + steps, tick)
    times = [b - a for a, b in zip(ticks, ticks[1:], strict=False)][warmup:]
    peak = torch.cuda.max_memory_allocated() / MIB if dev.type == "cuda" else None
    return {"times": times, "peak_mib": peak}


def _train(
    plan: Plan,
    dev: torch.device,
    data: TensorDataset,
    batch: int,
    dp: DPSpec | None,
    steps: int,
    tick: Callable[[int, float], None],
) -> None:
    """``steps`` steps of the site's training function on ``data``."""
    from client.tasks.registry import get_task
    from client.train import local_train
    from common.task_models import build_plan_model

    local_train(
        build_plan_model(plan),
        data,
        get_task(plan.task).loss(plan),
        epochs=1,
        batch_size=batch,
        learning_rate=plan.learning_rate,
        optimizer=plan.optimizer,
        device=dev,
        seed=0,
        dp=dp,
        max_steps=steps,
        multiplicity=plan.augmentation_multiplicity,
        trainable=plan.trainable_parameters,
        on_step=tick,
    )


def _spread(prefix: str, times: list[float]) -> dict:
    return {
        f"{prefix}_step_s": statistics.median(times),
        f"{prefix}_step_min_s": min(times),
        f"{prefix}_step_max_s": max(times),
    }


def _tail_memory(plan: Plan, dev: torch.device, dp: DPSpec, batch: int) -> object:
    """Peak MiB of one DP step at the Poisson bound; ``"OOM"`` if it does not fit."""
    import torch

    try:
        return measure(plan, dev, batch, dp, steps=1, warmup=0)["peak_mib"]
    except torch.cuda.OutOfMemoryError:
        return "OOM"


def _label(dev: torch.device, smoke: bool) -> str:
    if dev.type != "cuda":
        return SMOKE_LABEL
    return SCALED_LABEL if smoke else "the preset as is"


def _device(dev: torch.device) -> dict:
    """What ran the steps: the GPU's name and memory, or the CPU's threads."""
    import torch

    cuda = dev.type == "cuda"
    return {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "device_memory_mib": (
            torch.cuda.get_device_properties(0).total_memory / MIB if cuda else None
        ),
        "torch": torch.__version__,
        "cpu_threads": None if cuda else torch.get_num_threads(),
    }


def run(args: argparse.Namespace) -> dict:
    """Measure the plan on the device present; the figures as one flat dict."""
    import torch

    from client.privacy.dpsgd import DPSpec
    from client.train import select_device
    from common.models import get_model_spec
    from common.task_models import build_plan_model

    plan = load_preset(Path(args.plan), parse_sets(args.set))
    if plan.task != "segmentation":
        raise SystemExit(f"{args.plan}: gpu_plan measures segmentation plans")
    dev = select_device("auto")
    smoke = dev.type != "cuda" or args.scale_down
    if smoke:
        plan = scaled_down(plan)
    if dev.type == "cpu":
        # torch's threads on a shared CPU time the queue, not the step
        # (measured: 2.6 s against 0.16 s with one thread on 2 busy cores)
        torch.set_num_threads(args.cpu_threads)
    sched = schedule(plan, args.patients_per_site, args.delta, args.noise_multiplier)
    mode = get_model_spec(plan.model).grad_sample_mode
    dp = DPSpec(sched["noise_multiplier"], plan.dp_max_grad_norm, mode)
    b, n, w = plan.batch_size, args.steps, args.warmup
    try:
        plain = measure(plan, dev, b, None, n, w)
        private = measure(plan, dev, b, dp, n, w)
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(
            f"{args.plan}: a step of {b} patches of {plan.patch_size} does not fit "
            f"this GPU; try a smaller batch (--set batch-size={max(1, b // 2)})"
        ) from None
    tail = _tail_memory(plan, dev, dp, sched["batch_bound"])
    row: dict = {
        "label": _label(dev, smoke),
        "scaled_down": smoke,
        **_device(dev),
        "plan": str(args.plan),
        "model": plan.model,
        "parameters": sum(p.numel() for p in build_plan_model(plan).parameters()),
        "grad_sample_mode": mode,
        "spacing_mm": list(plan.spacing_mm),
        "patch_size": list(plan.patch_size),
        "batch_size": b,
        "augmentation_multiplicity": plan.augmentation_multiplicity,
        "steps": n,
        "warmup": w,
        **_spread("plain", plain["times"]),
        **_spread("dp", private["times"]),
        "plain_peak_mib": plain["peak_mib"],
        "dp_peak_mib": private["peak_mib"],
        "dp_bound_peak_mib": tail,
        **sched,
    }
    row["dp_plain_ratio"] = row["dp_step_s"] / row["plain_step_s"]
    row["plain_patients_per_s"] = b / row["plain_step_s"]
    row["patients_per_s"] = b / row["dp_step_s"]  # the sites train with DP
    row.update(cost(plan, row["patients_per_s"], args))
    return row


def cost(plan: Plan, patients_per_s: float, args: argparse.Namespace) -> dict:
    """A round's and the run's time from the DP throughput, and the run's cost
    with one GPU per site (the sites train in parallel; the coordinator needs
    none). Evaluation is not included."""
    train_s = args.patients_per_site * plan.local_epochs / patients_per_s
    round_s = train_s + args.round_floor_s
    run_s = plan.num_server_rounds * round_s
    return {
        "sites": args.sites,
        "patients_per_site": args.patients_per_site,
        "local_epochs": plan.local_epochs,
        "rounds": plan.num_server_rounds,
        "round_floor_s": args.round_floor_s,
        "round_train_s": train_s,
        "round_s": round_s,
        "run_s": run_s,
        "gpu_hours": args.sites * run_s / 3600,
        "gpu_hourly_usd": args.gpu_hourly_usd,
        "cost_usd": args.sites * run_s / 3600 * args.gpu_hourly_usd,
    }


# -- output --------------------------------------------------------------------------


def _mib(value: object) -> str:
    if value is None:
        return "n/a (CPU)"
    return value if isinstance(value, str) else f"{value:,.0f} MiB"


def _of(total: float | None) -> str:
    return f" of {total:,.0f} MiB" if total else ""


def _step(row: dict, kind: str) -> str:
    return (
        f"{row[f'{kind}_step_s']:.4f} s ({row[f'{kind}_step_min_s']:.4f}-"
        f"{row[f'{kind}_step_max_s']:.4f})"
    )


def report(row: dict) -> str:
    """The figures as a two-column table, under the run's label."""
    lines = [
        (
            "model",
            f"{row['model']} ({row['parameters']:,} parameters, DP "
            f"{row['grad_sample_mode']})",
        ),
        (
            "patch, batch",
            f"{'x'.join(map(str, row['patch_size']))} voxels, "
            f"{row['batch_size']} patients",
        ),
        ("plain step", _step(row, "plain")),
        ("DP-SGD step", _step(row, "dp")),
        ("DP / plain", f"{row['dp_plain_ratio']:.2f}x"),
        ("peak memory plain", _mib(row["plain_peak_mib"])),
        ("peak memory DP", _mib(row["dp_peak_mib"])),
        (
            f"peak memory DP, batch {row['batch_bound']}",
            _mib(row["dp_bound_peak_mib"]) + _of(row["device_memory_mib"]),
        ),
        ("throughput DP", f"{row['patients_per_s']:.4g} patients/s"),
        ("throughput plain", f"{row['plain_patients_per_s']:.4g} patients/s"),
        (
            "noise multiplier",
            f"{row['noise_multiplier']:.3f} "
            f"({'calibrated for ' if row['noise_calibrated'] else 'given; '}"
            f"{row['steps_per_site']} steps at q={row['sample_rate']:.4f})",
        ),
        (
            "round",
            f"{row['round_s']:.1f} s = {row['patients_per_site']} x "
            f"{row['local_epochs']} / {row['patients_per_s']:.4g} + "
            f"{row['round_floor_s']:g} s floor",
        ),
        ("run", f"{row['run_s'] / 3600:.2f} h ({row['rounds']} rounds)"),
        (
            "cost",
            f"${row['cost_usd']:,.2f} = {row['sites']} GPUs x "
            f"{row['run_s'] / 3600:.2f} h x ${row['gpu_hourly_usd']:g}/h (an input)",
        ),
    ]
    rows = [{"figure": k, "value": v} for k, v in lines]
    head = (
        f"{row['label']}: {row['device_name']}, torch {row['torch']}, median of "
        f"{row['steps']} steps after {row['warmup']} warm-up (range)"
    )
    cols = [
        Column("figure", "figure", width=30, align="<"),
        Column("value", "value", width=60, align="<"),
    ]
    note = "evaluation is not in the round time; see docs/gpu-plan.md"
    return "\n".join([head, table(rows, cols), note])


def _parser() -> argparse.ArgumentParser:
    ap = parser(__doc__)
    ap.add_argument("--plan", default=str(PRESET), help="a run-config TOML")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument(
        "--patients-per-site",
        type=int,
        default=200,
        help="training patients at each site",
    )
    ap.add_argument(
        "--gpu-hourly-usd",
        type=float,
        default=2.5,
        help="price of one GPU hour: an input, not a fact (2.5: an "
        "H100-class cloud GPU)",
    )
    ap.add_argument(
        "--round-floor-s",
        type=float,
        default=ROUND_FLOOR_S,
        help="a round's fixed cost beyond training (docs/benchmarks.md)",
    )
    ap.add_argument(
        "--delta",
        type=float,
        default=1e-3,
        help="the sites' delta, for the noise multiplier",
    )
    ap.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="the DP step's noise (default: calibrated for the plan's "
        "run at --delta, as a site does; the time does not depend on it)",
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="torch threads on a CPU (the smoke run)",
    )
    ap.add_argument(
        "--scale-down",
        action="store_true",
        help="the smoke run's patch and batch on CUDA too",
    )
    ap.add_argument("--require-cuda", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Measure the plan, print the table, write ``--json``; 1 without a GPU
    under ``--require-cuda``."""
    import torch

    args = _parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be at least 1")
    if args.require_cuda and not torch.cuda.is_available():
        print("FAIL: --require-cuda and no CUDA device is visible")
        return 1
    threads = torch.get_num_threads()
    try:
        row = run(args)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in this process
    print(report(row))
    write_json(args.json, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
