"""The site pipeline on a GPU: DP training, evaluation and prediction on CUDA.

CI has no GPU, so this is the check that kidneyfl's site code runs on CUDA when
one is present (``device: auto``): for a segmentation phantom site and a
classification phantom site it

- loads the data with the task's MONAI pipeline;
- trains one DP-SGD epoch (Opacus, the model's registered grad-sample mode)
  with ``select_device("auto")``, which must pick CUDA;
- evaluates the trained weights on CUDA and on CPU and compares the metrics
  (the same weights must score the same on both devices, within float noise);
- for segmentation, segments one scan with sliding-window inference on CUDA
  and on CPU and compares the label maps.

Prints one line per check and exits non-zero if one fails. Flower is not
needed (the ClientApp's work, not its messaging, is what touches the GPU).

    python benchmarks/cuda_check.py [--require-cuda]
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from harness import TINY_PLAN, parser, stopwatch

if TYPE_CHECKING:
    from client.tasks.base import Task, TaskData
    from common.config import Plan


def _verdict(ok: bool, line: str, failure: str, failures: list[str]) -> None:
    """Print a check's line with ``ok`` or ``FAIL``; a failure is remembered."""
    print(f"{line} -> {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(failure)


def _train(
    task_name: str,
    task: Task,
    data: TaskData,
    plan: Plan,
    dev: torch.device,
    failures: list[str],
) -> torch.nn.Module:
    """One DP-SGD epoch on ``dev``; returns the trained model."""
    from client.privacy.dpsgd import DPSpec
    from client.train import local_train
    from common.models import get_model_spec
    from common.task_models import build_plan_model

    model = build_plan_model(plan)
    with stopwatch() as train:
        stats = local_train(
            model,
            data.train,
            task.loss(plan),
            epochs=1,
            batch_size=plan.batch_size,
            learning_rate=plan.learning_rate,
            optimizer=plan.optimizer,
            device=dev,
            seed=0,
            dp=DPSpec(1.0, 1.0, get_model_spec(plan.model).grad_sample_mode),
        )
    on = {p.device.type for p in model.parameters()}
    _verdict(
        math.isfinite(stats.loss) and stats.steps > 0,
        f"{task_name}: DP epoch on {dev} ({on}): {stats.steps} steps, loss "
        f"{stats.loss:.4f}, {train.s:.1f} s",
        f"{task_name} training",
        failures,
    )
    return model


def _compare_evaluate(
    task_name: str,
    task: Task,
    model: torch.nn.Module,
    data: TaskData,
    plan: Plan,
    dev: torch.device,
    failures: list[str],
) -> None:
    """The same weights must score the same on ``dev`` and on the CPU."""
    m_dev = task.evaluate(model, data, plan, dev)
    m_cpu = task.evaluate(model.cpu(), data, plan, torch.device("cpu"))
    keys = sorted(k for k in m_cpu if isinstance(m_cpu[k], float))
    diff = max(abs(m_dev[k] - m_cpu[k]) for k in keys)
    shown = {k: round(m_dev[k], 4) for k in keys[:4]}
    _verdict(
        diff < 1e-3 and all(math.isfinite(m_dev[k]) for k in keys),
        f"{task_name}: evaluate on {dev} vs cpu: max |diff| {diff:.2e} over "
        f"{len(keys)} metrics {shown}",
        f"{task_name} evaluation",
        failures,
    )


def _compare_predict(
    model: torch.nn.Module,
    scan: Path,
    plan: Plan,
    dev: torch.device,
    failures: list[str],
) -> None:
    """Sliding-window segmentation of one scan on ``dev`` and on the CPU."""
    from client.tasks.segmentation.predict import segment

    lab_dev = segment(model, scan, plan, dev)
    lab_cpu = segment(model.cpu(), scan, plan, torch.device("cpu"))
    agree = float(np.mean(lab_dev == lab_cpu))
    _verdict(
        lab_dev.shape == lab_cpu.shape and agree > 0.999,
        f"segmentation: sliding-window predict on {dev} vs cpu: shape "
        f"{lab_dev.shape}, voxel agreement {agree:.5f}",
        "segmentation predict",
        failures,
    )


def _train_eval(
    task_name: str, site_yaml: Path, plan: Plan, failures: list[str]
) -> None:
    """Train, evaluate and (segmentation) predict on the device ``auto`` picks."""
    from client.tasks.registry import get_task
    from client.train import select_device
    from common.config import load_site_config

    site = load_site_config(site_yaml)
    task = get_task(plan.task)
    data = task.load_data(site, plan)
    dev = select_device("auto")
    model = _train(task_name, task, data, plan, dev, failures).cpu()
    _compare_evaluate(task_name, task, model, data, plan, dev, failures)
    if task_name == "segmentation":
        scan = sorted(Path(site.data.root).glob("case_*/imaging.nii.gz"))[0]
        _compare_predict(model, scan, plan, dev, failures)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, json_out=False)
    ap.add_argument("--require-cuda", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"torch {torch.__version__}, CUDA available: {cuda} ({name})")
    if args.require_cuda and not cuda:
        print("FAIL: no CUDA device")
        return 1
    from common.config import Plan
    from tests.fakes import cls_plan, write_cls_yaml, write_site_yaml

    failures: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        seg_yaml = write_site_yaml(tmp, "gpu-seg", cases=8, seed=2)
        seg_plan = Plan.model_validate(
            {
                **TINY_PLAN,
                "batch-size": 4,
                "learning-rate": 0.003,
                "model": "unet-tiny",
            }
        )
        _train_eval("segmentation", seg_yaml, seg_plan, failures)
        from common.config import load_site_config
        from sim.phantoms.sites import write_site_phantom

        cls_yaml = write_cls_yaml(tmp, "gpu-cls", cases=48, seed=3)
        write_site_phantom(load_site_config(cls_yaml))
        _train_eval("classification", cls_yaml, cls_plan(**{"batch-size": 8}), failures)
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
