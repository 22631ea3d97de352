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

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _train_eval(task_name: str, site_yaml: Path, plan, failures: list[str]) -> None:
    from client.tasks.base import get_task
    from client.train import DPSpec, local_train, select_device
    from common.config import load_site_config
    from common.models import get_model_spec
    from common.task_models import build_plan_model

    site = load_site_config(site_yaml)
    task = get_task(plan.task)
    data = task.load_data(site, plan)
    dev = select_device("auto")
    model = build_plan_model(plan)
    t0 = time.perf_counter()
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
    t_train = time.perf_counter() - t0
    on = {p.device.type for p in model.parameters()}
    ok = math.isfinite(stats.loss) and stats.steps > 0
    print(
        f"{task_name}: DP epoch on {dev} ({on}): {stats.steps} steps, loss "
        f"{stats.loss:.4f}, {t_train:.1f} s -> {'ok' if ok else 'FAIL'}"
    )
    if not ok:
        failures.append(f"{task_name} training")
    model = model.cpu()
    m_dev = task.evaluate(model, data, plan, dev)
    m_cpu = task.evaluate(model.cpu(), data, plan, torch.device("cpu"))
    keys = sorted(k for k in m_cpu if isinstance(m_cpu[k], float))
    diff = max(abs(m_dev[k] - m_cpu[k]) for k in keys)
    ok = diff < 1e-3 and all(math.isfinite(m_dev[k]) for k in keys)
    shown = {k: round(m_dev[k], 4) for k in keys[:4]}
    print(
        f"{task_name}: evaluate on {dev} vs cpu: max |diff| {diff:.2e} over "
        f"{len(keys)} metrics {shown} -> {'ok' if ok else 'FAIL'}"
    )
    if not ok:
        failures.append(f"{task_name} evaluation")
    if task_name == "segmentation":
        from client.tasks.segmentation.predict import segment

        scan = sorted(Path(site.data.root).glob("case_*/imaging.nii.gz"))[0]
        lab_dev = segment(model, scan, plan, dev)
        lab_cpu = segment(model.cpu(), scan, plan, torch.device("cpu"))
        agree = float(np.mean(lab_dev == lab_cpu))
        ok = lab_dev.shape == lab_cpu.shape and agree > 0.999
        print(
            f"segmentation: sliding-window predict on {dev} vs cpu: shape "
            f"{lab_dev.shape}, voxel agreement {agree:.5f} -> "
            f"{'ok' if ok else 'FAIL'}"
        )
        if not ok:
            failures.append("segmentation predict")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--require-cuda", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"torch {torch.__version__}, CUDA available: {cuda} ({name})")
    if args.require_cuda and not cuda:
        print("FAIL: no CUDA device")
        return 1
    from common.config import Plan
    from tests.client.test_classification import cls_plan, write_cls_yaml
    from tests.conftest import write_site_yaml

    failures: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        seg_yaml = write_site_yaml(tmp, "gpu-seg", cases=8, seed=2)
        seg_plan = Plan.model_validate(
            {
                "spacing-mm": "6,6,8",
                "patch-size": "32,32,16",
                "batch-size": 4,
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
