"""What every benchmark shares: the project on ``sys.path``, its command line,
phantom sites, timing, JSON output and the printed tables.

Each benchmark is a script run as a file (``.venv/bin/python
benchmarks/x.py``), which puts this folder first on ``sys.path``; it imports
this module as ``harness`` before anything of the project. (Not as
``benchmarks.harness``: Opacus installs a top-level package named
``benchmarks`` that would shadow this folder.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the project's packages, and tests/ for its fixtures
    sys.path.insert(0, str(ROOT))
PHANTOM_SCALE = 5.0  # coarse voxels: a case is a few thousand voxels
# the plan keys that make a segmentation round small (as in the tests)
TINY_PLAN = {"spacing-mm": "6,6,8", "patch-size": "32,32,16", "batch-size": 2}

# -- command line --------------------------------------------------------------------


def parser(doc: str | None, json_out: bool = True) -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc`` (a module's
    docstring), with ``--json PATH`` for the rows when ``json_out``."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0])
    if json_out:
        ap.add_argument("--json", default=None, help="also write the rows here")
    return ap


def int_list(text: str) -> list[int]:
    """``"3,10,30"`` -> ``[3, 10, 30]`` (an argparse ``type``)."""
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    """``"inf,1,3"`` -> ``[inf, 1.0, 3.0]`` (an argparse ``type``)."""
    return [float(x) for x in text.split(",") if x.strip()]


def names(text: str) -> list[str]:
    """``"unet-tiny,unet"`` -> ``["unet-tiny", "unet"]``, empty items dropped."""
    return [x for x in text.split(",") if x]


# -- phantom sites -------------------------------------------------------------------


def dp_privacy(dp: bool, max_epsilon: float = 100.0) -> dict:
    """A site's ``privacy`` section: DP with a ceiling of ``max_epsilon``, or off."""
    if not dp:
        return {"enabled": False}
    return {"enabled": True, "max_epsilon": max_epsilon, "delta": 1e-3}


def phantom_site(
    work: Path,
    name: str,
    *,
    cases: int,
    seed: int,
    profile: str = "standard-nephro",
    scale: float = PHANTOM_SCALE,
    privacy: dict | None = None,
    validation_fraction: float = 0.34,
    device: str = "cpu",
    declared: bool = True,
    generate: bool = True,
    data_root: Path | None = None,
) -> Path:
    """Write ``work/name.yaml`` for a phantom hospital and return its path.

    Data go to ``data_root`` (default ``work/data/name``), state to
    ``work/state/name``. ``generate`` writes the cases now; ``declared`` adds
    the ``phantom`` section, with which ``kidneyfl simulate`` writes missing
    cases itself and the report shows sample slices. A benchmark's sites are
    small, so they release aggregates over a single validation case (their
    explicit choice; the default floor is 5 patients).
    """
    from sim.phantoms.kits_writer import write_site
    from sim.phantoms.profiles import load_profile

    root = data_root or work / "data" / name
    if generate:
        write_site(root, load_profile(profile), cases, seed=seed, scale=scale)
    doc = {
        "name": name,
        "data": {"root": str(root), "validation_fraction": validation_fraction},
        "device": device,
        "state_dir": str(work / "state" / name),
        "privacy": {"min_cases_for_aggregates": 1} | (privacy or dp_privacy(True)),
    }
    if declared:
        doc["phantom"] = {
            "profile": profile,
            "cases": cases,
            "seed": seed,
            "scale": scale,
        }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# -- timing ------------------------------------------------------------------------


@dataclass
class Elapsed:
    """Seconds since the ``stopwatch`` block began; final once it ended."""

    start: float
    end: float | None = None

    @property
    def s(self) -> float:
        """Seconds measured (so far, inside the block)."""
        return (self.end or time.perf_counter()) - self.start


@contextmanager
def stopwatch() -> Iterator[Elapsed]:
    """``with stopwatch() as t: ...``, then ``t.s`` is the block's wall time
    (also when the block raised)."""
    t = Elapsed(time.perf_counter())
    try:
        yield t
    finally:
        t.end = time.perf_counter()


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        with stopwatch() as t:
            fn()
        times.append(t.s)
    return statistics.median(times)


# -- Flower outside a running app ----------------------------------------------------


def set_task_identity() -> None:
    """Flower's task identity, which messages built outside a running app need."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        setattr(TaskIdentity, attr, 1)


# -- output ------------------------------------------------------------------------


def write_json(path: str | Path | None, rows: object) -> None:
    """Write ``rows`` as indented JSON to ``path`` (nothing when ``path`` is None)."""
    if path:
        Path(path).write_text(json.dumps(rows, indent=2))


@dataclass(frozen=True)
class Column:
    """One column of a printed table: its header, the row key, the format
    (a ``format`` spec, e.g. ``".2f"``) of the value divided by ``scale``, in
    ``width`` characters aligned by ``align`` (``>`` or ``<``)."""

    header: str
    key: str
    spec: str = ""
    width: int = 10
    scale: float = 1.0
    align: str = ">"


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """Rows under a header line, one fixed-width line each."""
    lines = ["".join(f"{c.header:{c.align}{c.width}}" for c in columns)]
    for r in rows:
        cells = []
        for c in columns:
            value = r[c.key] / c.scale if c.scale != 1.0 else r[c.key]
            cells.append(f"{value:{c.align}{c.width}{c.spec}}")
        lines.append("".join(cells))
    return "\n".join(lines)


def met(ok: bool) -> str:
    """``yes``/``no`` for a target's column."""
    return "yes" if ok else "no"
