"""Aggregation throughput: K site updates of P parameters through the strategy.

For each (K, P) it times, side by side in this run:

- ``strategy``: kidneyfl's coordinator path, ``SiteAwareStrategy.aggregate_train``
  on Flower ``Message`` replies: the refusal filter, the update guard (keys,
  shapes, dtypes, NaN/Inf, the norm of every update) and FedAvg's case-weighted
  mean, the guard and the mean in one chunked pass over each update's bytes
  (``server/updates.py``), and the result serialised into a Flower ArrayRecord;
- ``numpy``: a plain case-weighted mean of the same arrays
  (``sum(w_k * x_k) / sum(w_k)``), the lower bound any framework pays;
- ``copy``: one memory copy of all K updates (``np.copyto``), i.e. the machine's
  memory bandwidth for that many bytes.

and prints ``strategy / numpy`` (target: under 2) and the bandwidth each
reaches. The model is split into tensors of about 1 M parameters, as a U-Net's
state dict is. Ratios matter; absolute times are context only.

    .venv/bin/python benchmarks/aggregation.py [--max-params 30000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _state(params: int, seed: int, chunk: int = 1_000_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out, left, i = {}, params, 0
    while left > 0:
        n = min(chunk, left)
        out[f"layer{i}.weight"] = rng.standard_normal(n, dtype=np.float32)
        left -= n
        i += 1
    return out


def measure(k: int, params: int, repeats: int = 3) -> dict:
    """One (K, P) point: seconds per aggregation and ratios."""
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata
    from flwr.supercore.task_identity import TaskIdentity

    from common import wire
    from server.strategy import SiteAwareStrategy, build_strategy

    for attr in ("_run_id", "_task_id", "_node_id"):
        setattr(TaskIdentity, attr, 1)
    states = [_state(params, seed) for seed in range(k)]
    weights = np.arange(1, k + 1, dtype=np.float64)
    names = list(states[0])

    def reply(node: int, state: dict[str, np.ndarray], n: float) -> Message:
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

    replies = [
        reply(i + 1, s, float(w))
        for i, (s, w) in enumerate(zip(states, weights, strict=True))
    ]
    strategy = SiteAwareStrategy(
        build_strategy("fedavg", min_sites=1, fraction_evaluate=0.0),
        min_sites=1,
        round_offset=0,
        base_config={},
        on_round_end=lambda rec, arrays: None,
    )
    strategy._sent = replies[0].content[wire.ARRAYS]  # the guard's reference

    def via_strategy() -> None:
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None

    def via_numpy() -> dict[str, np.ndarray]:
        total = weights.sum()
        out = {}
        for name in names:
            acc = np.zeros_like(states[0][name])
            for s, w in zip(states, weights, strict=True):
                acc += s[name] * np.float32(w / total)
            out[name] = acc
        return out

    dst = [{n: np.empty_like(a) for n, a in s.items()} for s in states]

    def copy_all() -> None:
        for s, d in zip(states, dst, strict=True):
            for n in names:
                np.copyto(d[n], s[n])

    # Same answer before timing anything.
    got = strategy.aggregate_train(1, replies)[0]
    ref = via_numpy()
    err = max(float(np.max(np.abs(got[n].numpy() - ref[n]))) for n in names)
    assert err < 1e-4, f"strategy and numpy disagree by {err}"
    t_strategy = _timed(via_strategy, repeats)
    t_numpy = _timed(via_numpy, repeats)
    t_copy = _timed(copy_all, repeats)
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


def grid(max_params: int) -> list[tuple[int, int]]:
    """(K, P) points, keeping K x P x 4 bytes under about 2 GB per copy."""
    points = []
    for k in (3, 10, 50):
        for p in (1_000_000, 10_000_000, 30_000_000):
            if p <= max_params and k * p * 4 <= 2.0e9:
                points.append((k, p))
    return points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-params", type=int, default=30_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = [measure(k, p, args.repeats) for k, p in grid(args.max_params)]
    print(
        f"{'K':>4}{'P':>12}{'strategy s':>12}{'numpy s':>10}{'ratio':>8}"
        f"{'strat GB/s':>12}{'copy GB/s':>11}"
    )
    for r in rows:
        print(
            f"{r['sites']:>4}{r['params']:>12,}{r['strategy_s']:>12.3f}"
            f"{r['numpy_s']:>10.3f}{r['strategy_over_numpy']:>8.2f}"
            f"{r['strategy_gb_per_s']:>12.2f}{r['copy_gb_per_s']:>11.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
