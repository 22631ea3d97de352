"""Flower's own aggregation strategies, by the name a plan gives them.

Every strategy is Flower's implementation from ``flwr.serverapp.strategy``; this
module only maps plan keys onto their arguments, and reads and restores the
state some of them keep between rounds (FedAdam/FedYogi/FedAdagrad's moments
``m_t``/``v_t``, FedAvgM's momentum), so that a resumed run continues exactly
where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from common import wire
from common.config import Plan

log = logging.getLogger("kidneyfl.server")

# Defaults for ``server-learning-rate = 0`` (the strategy's own default).
_DEFAULT_ETA = {"fedadam": 0.1, "fedyogi": 0.01, "fedadagrad": 0.1, "fedavgm": 1.0}


def _fedopt(cls: type) -> Callable[..., Strategy]:
    def build(common: dict[str, Any], o: dict[str, Any]) -> Strategy:
        kw: dict[str, Any] = {"eta": o["eta"], "tau": o["tau"]}
        if o.get("eta_l") is not None:
            kw["eta_l"] = o["eta_l"]
        if cls is not FedAdagrad:
            kw.update(beta_1=o["beta_1"], beta_2=o["beta_2"])
        return cls(**common, **kw)

    return build


BUILDERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], Strategy]] = {
    "fedavg": lambda c, o: FedAvg(**c),
    "fedprox": lambda c, o: FedProx(**c, proximal_mu=o["proximal_mu"]),
    "fedadam": _fedopt(FedAdam),
    "fedyogi": _fedopt(FedYogi),
    "fedadagrad": _fedopt(FedAdagrad),
    "fedavgm": lambda c, o: FedAvgM(
        **c, server_learning_rate=o["eta"], server_momentum=o["momentum"]
    ),
    "fedmedian": lambda c, o: FedMedian(**c),
    "fedtrimmedavg": lambda c, o: FedTrimmedAvg(**c, beta=o["trimmed_beta"]),
    "krum": lambda c, o: Krum(**c, num_malicious_nodes=o["num_malicious"]),
    "multikrum": lambda c, o: MultiKrum(
        **c,
        num_malicious_nodes=o["num_malicious"],
        num_nodes_to_select=o["krum_select"],
    ),
    "bulyan": lambda c, o: Bulyan(**c, num_malicious_nodes=o["num_malicious"]),
}


def strategy_options(plan: Plan) -> dict[str, Any]:
    """The plan keys the strategies read, as :func:`build_strategy` kwargs."""
    return {
        "proximal_mu": plan.proximal_mu,
        "server_learning_rate": plan.server_learning_rate,
        "server_momentum": plan.server_momentum,
        "beta_1": plan.server_beta_1,
        "beta_2": plan.server_beta_2,
        "tau": plan.server_tau,
        "eta_l": plan.learning_rate,
        "trimmed_beta": plan.trimmed_beta,
        "num_malicious": plan.num_malicious_sites,
        "krum_select": plan.krum_select,
    }


def build_strategy(
    name: str,
    min_sites: int,
    fraction_evaluate: float,
    central_dp: str = "off",
    central_dp_noise: float = 0.0,
    central_dp_clip: float = 1.0,
    num_sites: int | None = None,
    *,
    proximal_mu: float = 0.0,
    server_learning_rate: float = 0.0,
    server_momentum: float = 0.0,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    tau: float = 1e-3,
    eta_l: float | None = None,
    trimmed_beta: float = 0.2,
    num_malicious: int = 0,
    krum_select: int = 1,
) -> Strategy:
    """Flower's own strategy for a plan's ``strategy`` name.

    ``server_learning_rate`` is FedAvgM's server learning rate and FedOpt's
    ``eta``; 0 takes the strategy's default. With ``central_dp="server-fixed"``
    the strategy is wrapped in Flower's
    ``DifferentialPrivacyServerSideFixedClipping``: each site's update is
    clipped to ``central_dp_clip`` (L2, relative to the global model) and
    Gaussian noise of std ``central_dp_noise * central_dp_clip / num_sites`` is
    added to the aggregate. That bounds what any one *hospital* can move the
    model; it is on top of, not instead of, the sample-level DP-SGD at sites.

    Raises
    ------
    ValueError
        For an unknown strategy or central-DP mode.
    """
    if name not in BUILDERS:
        raise ValueError(
            f"unknown strategy {name!r}; available: {', '.join(sorted(BUILDERS))}"
        )
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites if fraction_evaluate > 0 else 0,
        "min_available_nodes": min_sites,
        "weighted_by_key": wire.NUM_EXAMPLES,
    }
    options = {
        "proximal_mu": proximal_mu,
        "eta": server_learning_rate or _DEFAULT_ETA.get(name, 1.0),
        "momentum": server_momentum,
        "beta_1": beta_1,
        "beta_2": beta_2,
        "tau": tau,
        "eta_l": eta_l,
        "trimmed_beta": trimmed_beta,
        "num_malicious": num_malicious,
        "krum_select": krum_select,
    }
    inner = BUILDERS[name](common, options)
    if central_dp == "off":
        return inner
    if central_dp != "server-fixed":
        raise ValueError(f"unknown central-dp {central_dp!r}; use off or server-fixed")
    return DifferentialPrivacyServerSideFixedClipping(
        inner, central_dp_noise, central_dp_clip, max(num_sites or min_sites, 1)
    )


# -- server optimiser state ---------------------------------------------------
# Where Flower keeps it (1.41 and 1.42): FedOpt (FedAdam, FedYogi, FedAdagrad)
# in ``m_t`` and ``v_t`` (dicts of arrays by key); FedAvgM in ``momentum_vector``
# (a list of arrays in the model's key order). Other strategies keep none.
_DICT_STATE = ("m_t", "v_t")
_LIST_STATE = ("momentum_vector",)


def base_strategy(strategy: Strategy) -> Strategy:
    """The innermost strategy under wrappers (central DP, kidneyfl's own)."""
    seen = 0
    while seen < 10:
        inner = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
        if not isinstance(inner, Strategy):
            return strategy
        strategy, seen = inner, seen + 1
    return strategy


def export_strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's between-round state as flat ``name/key`` arrays.

    Empty for strategies without state, or before their first aggregation.
    """
    base = base_strategy(strategy)
    out: dict[str, np.ndarray] = {}
    for attr in _DICT_STATE:
        value = getattr(base, attr, None)
        for key, arr in (value or {}).items():
            out[f"{attr}/{key}"] = np.array(arr, copy=True)
    for attr in _LIST_STATE:
        value = getattr(base, attr, None)
        for i, arr in enumerate(value or []):
            out[f"{attr}/{i:06d}"] = np.array(arr, copy=True)
    return out


def import_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Restore what :func:`export_strategy_state` saved, in place.

    Raises
    ------
    ValueError
        If the state holds attributes this strategy does not have (the
        checkpoint was made with another strategy).
    """
    base = base_strategy(strategy)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in state.items():
        attr, _, key = name.partition("/")
        grouped.setdefault(attr, {})[key] = np.array(arr, copy=True)
    for attr, values in grouped.items():
        if attr not in _DICT_STATE + _LIST_STATE or not hasattr(base, attr):
            raise ValueError(
                f"checkpoint holds server state {attr!r} that strategy "
                f"{type(base).__name__} does not keep; resume with the plan's "
                "original strategy"
            )
        if attr in _LIST_STATE:
            setattr(base, attr, [values[k] for k in sorted(values)])
        else:
            setattr(base, attr, values)
    if grouped:
        log.info("restored %s server state: %s", type(base).__name__, sorted(grouped))


# Everything a strategy's aggregate_train may change between rounds: the
# moments and momentum above, and the model FedAvgM keeps as its current one.
# Flower replaces these attributes, never updates them in place, so holding
# the old references is a snapshot.
_ROUND_STATE = (*_DICT_STATE, *_LIST_STATE, "current_arrays")


def snapshot_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's between-round attributes as they are now (references).

    :func:`restore_state` puts them back after an aggregate that is not kept,
    so a failed round leaves no trace in the server optimiser.
    """
    base = base_strategy(strategy)
    return {a: getattr(base, a) for a in _ROUND_STATE if hasattr(base, a)}


def restore_state(strategy: Strategy, snapshot: dict[str, Any]) -> None:
    """Undo every change to the attributes :func:`snapshot_state` saw."""
    base = base_strategy(strategy)
    for attr, value in snapshot.items():
        setattr(base, attr, value)
