"""A deployment plan to copy and edit: ``kidneyfl coordinator plan PATH``.

The plan is the run's settings for ``flwr run . consortium -c PLAN``: overrides
of ``pyproject.toml``'s ``[tool.flwr.app.config]``, each validated by
``common.config.Plan`` before anything starts. ``sites/plan.toml`` is this
template with its defaults (``tests/server/test_plan_template.py`` keeps them
equal), so the example in the repository and the command never drift apart.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from common.atomic import atomic_write_text
from common.config import load_plan

TEMPLATE = """\
# The consortium's plan for a deployed run: overrides of pyproject.toml's
# [tool.flwr.app.config], passed with `flwr run . consortium -c PLAN.toml`.
# Every key is validated by common.config.Plan before anything starts.
run-name = "{run_name}"
out-dir = "{out_dir}"   # absolute: the ServerApp runs by the SuperLink
num-server-rounds = {rounds}
min-sites = {min_sites}                    # a round needs this many sites
expected-sites = {expected}               # round 1 waits for all of them...
site-wait-timeout = 600.0        # ...up to this, then starts or stops cleanly
round-timeout = 900.0            # a site that has not answered by then is left out
dp-target-epsilon = {epsilon}
resume = false                   # true: continue run-name from its last checkpoint
"""
DEFAULTS = {
    "run_name": "trial-1",
    "out_dir": "/srv/kidneyfl/runs",
    "rounds": 5,
    "min_sites": 2,
    "expected": 3,
    "epsilon": 8.0,
}
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def render(**values: object) -> str:
    """The plan's text with ``values`` over :data:`DEFAULTS`, validated.

    Raises
    ------
    ValueError
        A run name that is not a short plain name, a relative out-dir, a
        minimum above the expected sites, or anything ``Plan`` refuses.
    """
    v = {**DEFAULTS, **{k: x for k, x in values.items() if x is not None}}
    if not RUN_NAME.fullmatch(str(v["run_name"])):
        raise ValueError(
            f"run name {v['run_name']!r}: use letters, digits, '.', '_' and '-' "
            "(at most 64)"
        )
    if not Path(str(v["out_dir"])).is_absolute() or '"' in str(v["out_dir"]):
        raise ValueError(
            f"out-dir {v['out_dir']!r} must be an absolute path: the ServerApp "
            "runs in the SuperLink's working directory, not yours"
        )
    if not 1 <= int(v["min_sites"]) <= int(v["expected"]):  # type: ignore[call-overload]
        raise ValueError(
            f"min-sites {v['min_sites']} must be from 1 to the expected sites "
            f"({v['expected']})"
        )
    text = TEMPLATE.format(**v)
    load_plan(tomllib.loads(text))  # every key as the ServerApp will check it
    return text


def write_plan(path: Path, **values: object) -> Path:
    """Write :func:`render`'s plan to ``path``; never over an existing file."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; edit it, or give another path")
    atomic_write_text(path, render(**values))
    return path
