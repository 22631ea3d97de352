"""Aggregation throughput: K site updates of P parameters through the strategy.

For each (K, P) it times, side by side in this run:

- ``strategy``: kidneyfl's coordinator path, ``SiteAwareStrategy.aggregate_train``
  on Flower ``Message`` replies: the refusal filter, the update guard (keys,
  shapes, dtypes, NaN/Inf, the norm of every update) and FedAvg's case-weighted
  mean, the guard and the mean in one chunked pass over each update's bytes
  (``server/strategy/updates.py``), and the result serialised into a Flower ArrayRecord;
- ``numpy``: a plain case-weighted mean of the same arrays
  (``sum(w_k * x_k) / sum(w_k)``), the lower bound any framework pays;
- ``copy``: one memory copy of all K updates (``np.copyto``), i.e. the machine's
  memory bandwidth for that many bytes.

and prints ``strategy / numpy`` (target: under 2) and the bandwidth each
reaches. The model is split into tensors of about 1 M parameters, as a U-Net's
state dict is. Ratios matter; absolute times are context only.

    .venv/bin/python benchmarks/aggregation.py [--max-params 30000000]
        [--sites 3,10,50] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from harness import (
    Column,
    int_list,
    median_time,
    parser,
    set_task_identity,
    table,
    write_json,
)

if TYPE_CHECKING:
    from flwr.app import Message

    from server.strategy.wrapper import SiteAwareStrategy

COLUMNS = [
    Column("K", "sites", width=4),
    Column("P", "params", ",", 12),
    Column("strategy s", "strategy_s", ".3f", 12),
    Column("numpy s", "numpy_s", ".3f", 10),
    Column("ratio", "strategy_over_numpy", ".2f", 8),
    Column("strat GB/s", "strategy_gb_per_s", ".2f", 12),
    Column("copy GB/s", "copy_gb_per_s", ".2f", 11),
]


def _state(params: int, seed: int, chunk: int = 1_000_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out, left, i = {}, params, 0
    while left > 0:
        n = min(chunk, left)
        out[f"layer{i}.weight"] = rng.standard_normal(n, dtype=np.float32)
        left -= n
        i += 1
    return out


def _reply(node: int, state: dict[str, np.ndarray], n: float) -> Message:
    """Site ``node``'s train reply: its arrays and ``n`` training cases."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata

    from common import wire

    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord({n_: Array(a) for n_, a in state.items()}),
            wire.METRICS: MetricRecord(
                {wire.NUM_EXAMPLES: n, wire.TRAIN_LOSS: 1.0, wire.REFUSED: 0}
            ),
            wire.SITE: ConfigRecord({wire.SITE_NAME: f"site-{node}"}),
        }
    )
    return make_message(meta, content=content)


def _wrapper(reference: object) -> SiteAwareStrategy:
    """The coordinator's FedAvg wrapper, its update guard set to ``reference``."""
    from server.strategy.aggregators import build_strategy
    from server.strategy.wrapper import SiteAwareStrategy

    strategy = SiteAwareStrategy(
        build_strategy("fedavg", min_sites=1, fraction_evaluate=0.0),
        min_sites=1,
        round_offset=0,
        base_config={},
        on_round_end=lambda rec, arrays: None,
    )
    strategy._sent = reference  # the guard's reference
    return strategy


def numpy_mean(
    states: list[dict[str, np.ndarray]], weights: np.ndarray
) -> dict[str, np.ndarray]:
    """The plain case-weighted mean, ``sum(w_k * x_k) / sum(w_k)``."""
    total = weights.sum()
    out = {}
    for name in states[0]:
        acc = np.zeros_like(states[0][name])
        for s, w in zip(states, weights, strict=True):
            acc += s[name] * np.float32(w / total)
        out[name] = acc
    return out


def _copier(states: list[dict[str, np.ndarray]]) -> Callable[[], None]:
    """A function copying every update once (into buffers allocated now)."""
    dst = [{n: np.empty_like(a) for n, a in s.items()} for s in states]

    def copy_all() -> None:
        for s, d in zip(states, dst, strict=True):
            for n in s:
                np.copyto(d[n], s[n])

    return copy_all


def measure(k: int, params: int, repeats: int = 3) -> dict:
    """One (K, P) point: seconds per aggregation and ratios."""
    from common import wire

    set_task_identity()
    states = [_state(params, seed) for seed in range(k)]
    weights = np.arange(1, k + 1, dtype=np.float64)
    replies = [
        _reply(i + 1, s, float(w))
        for i, (s, w) in enumerate(zip(states, weights, strict=True))
    ]
    strategy = _wrapper(replies[0].content[wire.ARRAYS])

    def via_strategy() -> None:
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None

    # Same answer before timing anything.
    got = strategy.aggregate_train(1, replies)[0]
    ref = numpy_mean(states, weights)
    err = max(float(np.max(np.abs(got[n].numpy() - ref[n]))) for n in ref)
    assert err < 1e-4, f"strategy and numpy disagree by {err}"
    t_strategy = median_time(via_strategy, repeats)
    t_numpy = median_time(lambda: numpy_mean(states, weights), repeats)
    t_copy = median_time(_copier(states), repeats)
    gbytes = k * params * 4 / 1e9
    return {
        "sites": k,
        "params": params,
        "strategy_s": t_strategy,
        "numpy_s": t_numpy,
        "copy_s": t_copy,
        "strategy_over_numpy": t_strategy / t_numpy,
        "strategy_gb_per_s": gbytes / t_strategy,
        "numpy_gb_per_s": gbytes / t_numpy,
        "copy_gb_per_s": gbytes / t_copy,
    }


def grid(max_params: int, sites: list[int]) -> list[tuple[int, int]]:
    """(K, P) points, keeping K x P x 4 bytes under about 2 GB per copy."""
    points = []
    for k in sites:
        for p in (1_000_000, 10_000_000, 30_000_000):
            if p <= max_params and k * p * 4 <= 2.0e9:
                points.append((k, p))
    return points


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--max-params", type=int, default=30_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sites", type=int_list, default=[3, 10, 50])
    args = ap.parse_args(argv)
    points = grid(args.max_params, args.sites)
    rows = [measure(k, p, args.repeats) for k, p in points]
    print(table(rows, COLUMNS))
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
