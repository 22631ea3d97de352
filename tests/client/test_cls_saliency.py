"""Saliency maps of the classification task's ``predict``: occlusion
sensitivity, the PNG beside the JSON, and that the map points at the evidence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from PIL import Image
from torch import nn

from client.tasks.classification.data import load_slice
from client.tasks.classification.saliency import (
    METHOD,
    saliency_map,
    write_saliency_png,
)
from client.tasks.registry import get_task
from common.models import build_model
from common.task_models import build_plan_model
from sim.phantoms.profiles import load_profile
from sim.phantoms.slices import write_cls_site
from tests.fakes import cls_plan

CPU = torch.device("cpu")
SIDE = 32
QUADRANTS = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}  # class -> (row, column)


def _quadrant_mass(sal: np.ndarray, q: int) -> float:
    """The share of the map's sum in quadrant ``q`` of :data:`QUADRANTS`."""
    half = sal.shape[0] // 2
    r, c = QUADRANTS[q]
    part = sal[r * half : (r + 1) * half, c * half : (c + 1) * half]
    return float(part.sum() / sal.sum())


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these 32-pixel nets gain nothing from more, and on
    a busy machine OpenMP's spinning threads made the training test 5-50 times
    slower (measured: 1.3 s on one thread, 8-67 s on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One phantom tumour slice (a 1-case site) and the plan's untrained model."""
    root = tmp_path_factory.mktemp("cls_saliency")
    write_cls_site(root, load_profile("standard-nephro"), 1, {"tumour": 1}, seed=3)
    return root / "images" / "case_00000.nii.gz", cls_plan()


def test_predict_writes_a_saliency_png_beside_the_json(phantom, tmp_path):
    image, plan = phantom
    model = build_plan_model(plan)
    first = next(model.parameters())
    first.requires_grad_(False)  # a frozen layer must stay frozen
    flags = [p.requires_grad for p in model.parameters()]
    task = get_task("classification")

    plain = task.predict(model, image, plan, CPU)
    out = task.predict(model, image, plan, CPU, tmp_path / "p")

    assert "saliency" not in plain  # no output, no map
    # the map does not change the answer, to the last bit
    assert out["class"] == plain["class"]
    assert out["probabilities"] == plain["probabilities"]
    assert out["saliency-method"] == METHOD == "occlusion-sensitivity"
    saved = json.loads((tmp_path / "p" / "case_00000.json").read_text())
    png = tmp_path / "p" / "case_00000_saliency.png"
    assert saved["saliency"] == out["saliency"] == str(png)
    assert saved["saliency-method"] == METHOD and saved["class"] == out["class"]
    # only the two files: no temporary file left behind
    assert sorted(f.name for f in png.parent.iterdir()) == [
        "case_00000.json",
        "case_00000_saliency.png",
    ]
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.width == im.height >= 4 * SIDE  # the square slice's aspect
        pixels = np.asarray(im.convert("RGB"), dtype=float)
    assert pixels.std() > 5  # a picture, not a blank
    # no gradient taken: nothing frozen, unfrozen or accumulated
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())

    # an explicit .json output: the PNG goes beside it, named by the image
    task.predict(model, image, plan, CPU, tmp_path / "q" / "result.json")
    assert (tmp_path / "q" / "case_00000_saliency.png").is_file()


def test_saliency_of_a_phantom_is_finite_in_unit_range_and_not_flat(phantom):
    image, plan = phantom
    model = build_plan_model(plan)
    model.train()
    x = load_slice(image, plan)[None]
    with torch.no_grad():
        before = model(x)
    sal = saliency_map(model, x, class_index=2)
    assert sal.shape == (SIDE, SIDE) and sal.dtype == np.float32
    assert np.isfinite(sal).all() and sal.min() >= 0 and sal.max() == 1
    assert np.ptp(sal) > 0.5 and np.unique(sal).size > 10
    # the model is left as it came: training mode, same outputs
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_saliency_of_an_opacus_wrapped_model_is_the_plain_one(phantom):
    image, plan = phantom
    model = build_plan_model(plan)
    x = load_slice(image, plan)[None]
    plain = saliency_map(model, x, 1)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    assert np.array_equal(saliency_map(wrapped, x, 1), plain)
    assert np.array_equal(saliency_map(model, x, 1), plain)  # hooks attached
    # forward passes only: Opacus captured nothing, no per-sample gradient
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    wrapped._close()


def test_saliency_refuses_bad_inputs():
    model = build_model("resnet-tiny", 1, 4)
    with pytest.raises(ValueError, match=r"\(1, C, H, W\)"):
        saliency_map(model, torch.zeros(2, 1, SIDE, SIDE), 0)
    with pytest.raises(ValueError, match="not one of the model's 4 classes"):
        saliency_map(model, torch.zeros(1, 1, SIDE, SIDE), 4)


class QuadrantLogits(nn.Module):
    """Logit k = 8 x the mean intensity of quadrant k, and nothing else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        means = []
        for r, c in QUADRANTS.values():
            part = x[..., r * half : (r + 1) * half, c * half : (c + 1) * half]
            means.append(part.mean(dim=(1, 2, 3)))
        return 8 * torch.stack(means, dim=1)


def _slice_with_square(
    q: int, gen: torch.Generator, size: int = 8, at: tuple[int, int] | None = None
) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """A dark noisy slice with a bright square in quadrant ``q`` (its centre,
    or ``at`` within the quadrant) and the square's rows and columns."""
    x = 0.2 + 0.03 * torch.randn(1, 1, SIDE, SIDE, generator=gen)
    half = SIDE // 2
    r0, c0 = at if at is not None else ((half - size) // 2,) * 2
    r, c = QUADRANTS[q]
    rows = slice(r * half + r0, r * half + r0 + size)
    cols = slice(c * half + c0, c * half + c0 + size)
    x[0, 0, rows, cols] = 0.9
    return x, (rows, cols)


@pytest.mark.parametrize("q", sorted(QUADRANTS))
def test_saliency_lies_in_the_quadrant_the_logit_reads(q):
    gen = torch.Generator().manual_seed(q)
    x, _ = _slice_with_square(q, gen)
    sal = saliency_map(QuadrantLogits(), x, q)
    # the occluders straddling the midlines lend a little to the neighbours
    assert _quadrant_mass(sal, q) > 0.9
    # another class's logit reads only its own dark quadrant: hiding part of
    # it with the slice's mean brightens it, so no region is evidence
    assert not saliency_map(QuadrantLogits(), x, (q + 1) % 4).any()


def test_trained_resnet_saliency_finds_the_bright_square():
    """resnet-tiny (GroupNorm, global max-pooling) trained for the test to tell
    a slice with a bright square anywhere (class 1) from one without (0)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model("resnet-tiny", 1, 4, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        xs, ys = [], []
        for _ in range(32):
            label = int(torch.randint(2, (1,), generator=gen))
            q = int(torch.randint(4, (1,), generator=gen))
            at = torch.randint(0, SIDE // 2 - 6, (2,), generator=gen).tolist()
            x, _ = _slice_with_square(q, gen, 6, at)
            if not label:
                x = 0.2 + 0.03 * torch.randn(1, 1, SIDE, SIDE, generator=gen)
            xs.append(x)
            ys.append(label)
        loss = nn.functional.cross_entropy(model(torch.cat(xs)), torch.tensor(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for q in QUADRANTS:
        x, (rows, cols) = _slice_with_square(q, gen, 6, (5, 5))
        with torch.no_grad():
            assert int(model(x).argmax()) == 1
        sal = saliency_map(model, x, 1)
        r, c = np.unravel_index(int(sal.argmax()), sal.shape)
        assert (
            rows.start - 2 <= r < rows.stop + 2 and cols.start - 2 <= c < cols.stop + 2
        )
        assert _quadrant_mass(sal, q) > 0.5


def test_png_has_the_slice_aspect_and_draws_titles_as_typed(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (20, 30))
    sal = np.zeros((20, 30))
    sal[5:10, 20:25] = 1.0
    title = "stone $\\frac{a}{b}$ p = 0.93"  # math text would fail or change it
    out = write_saliency_png(image, sal, tmp_path / "a" / "s.png", title)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.width * 20 == im.height * 30  # rows x columns kept
    out = write_saliency_png(image, sal, tmp_path / "t.png", "t", xy_axes=True)
    with Image.open(out) as im:
        assert im.width * 30 == im.height * 20  # (x, y): drawn transposed
    with pytest.raises(ValueError, match="one shape"):
        write_saliency_png(image, sal.T, tmp_path / "bad.png", "t")
    with pytest.raises(ValueError, match="finite"):
        write_saliency_png(image, sal * np.nan, tmp_path / "bad.png", "t")
    assert not (tmp_path / "bad.png").exists()
