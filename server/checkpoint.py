"""Checkpoints that describe themselves and survive a crash.

Each round writes the global weights (``round-NNNN.pt``) and a JSON sidecar
(round, plan, model, metrics, epsilon per site, package version, the weights'
SHA-256), both atomically (temp file, fsync, rename). ``latest.json`` is written
last, so a crash at any point leaves the previous round's checkpoint intact.

Strategies with server optimiser state (FedAdam/FedYogi/FedAdagrad moments,
FedAvgM momentum) also write ``round-NNNN.server.pt``, checksummed in the same
sidecar, so that a resumed run continues the exact same optimisation. With
``ema-decay`` the moving average of the global model goes to
``round-NNNN.ema.pt`` (checksummed in the sidecar too): ``round-NNNN.pt`` stays
what the next round trains from, the average is what the round evaluated.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic import atomic_write_bytes, atomic_write_json

LATEST = "latest.json"
# The largest epsilon any site had spent by a round (the site YAML's
# ``max_epsilon`` is a site's ceiling); sidecars before issue 18 called it
# ``max_epsilon``, and still read.
MAX_EPSILON_SPENT_KEY = "max_epsilon_spent"
_OLD_MAX_EPSILON_SPENT_KEY = "max_epsilon"
# The sidecar key of the moving average's file (``ema-decay``); its checksum
# is under ``ema_weights_sha256``.
EMA_KEY = "ema_weights"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not match the plan."""


def package_version() -> str:
    """Installed kidneyfl version, or ``unknown`` when run from a source tree."""
    try:
        return metadata.version("kidneyfl")
    except metadata.PackageNotFoundError:
        return "unknown"


def max_epsilon_spent(meta: dict[str, Any]) -> float | None:
    """The largest epsilon spent by any site, from a round's sidecar (old or
    new key); None where no site reported one (DP off)."""
    if MAX_EPSILON_SPENT_KEY in meta:
        return meta[MAX_EPSILON_SPENT_KEY]
    return meta.get(_OLD_MAX_EPSILON_SPENT_KEY)


def save_checkpoint(
    ckpt_dir: Path,
    round_: int,
    state: OrderedDict[str, torch.Tensor],
    sidecar: dict[str, Any],
    server_state: dict[str, np.ndarray] | None = None,
    ema_state: OrderedDict[str, torch.Tensor] | None = None,
) -> Path:
    """Write one round's weights (and server state, and moving average) and
    sidecar; returns the sidecar path."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    weights = ckpt_dir / f"round-{round_:04d}.pt"
    atomic_write_bytes(weights, data)
    meta = dict(sidecar)
    if server_state:
        tensors = {
            k: torch.from_numpy(np.array(v, order="C"))  # keeps 0-d as 0-d
            for k, v in server_state.items()
        }
        name, sha = _save_extra(ckpt_dir / f"round-{round_:04d}.server.pt", tensors)
        meta.update(server_state=name, server_state_sha256=sha)
    if ema_state is not None:
        name, sha = _save_extra(ckpt_dir / f"round-{round_:04d}.ema.pt", ema_state)
        meta.update({EMA_KEY: name, f"{EMA_KEY}_sha256": sha})
    meta.update(
        round=round_,
        weights=weights.name,
        sha256=hashlib.sha256(data).hexdigest(),
        kidneyfl_version=package_version(),
    )
    side = ckpt_dir / f"round-{round_:04d}.json"
    atomic_write_json(side, meta)
    atomic_write_json(ckpt_dir / LATEST, meta)
    return side


def _save_extra(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """Write a tensor file beside a round's weights; its name and SHA-256."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path.name, hashlib.sha256(buf.getvalue()).hexdigest()


def _load_extra(ckpt_dir: Path, meta: dict[str, Any], key: str) -> dict | None:
    """A tensor file named in the sidecar under ``key``, checksum verified
    (None when the sidecar names none)."""
    name = meta.get(key)
    if not name:
        return None
    path = ckpt_dir / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if hashlib.sha256(data).hexdigest() != meta.get(f"{key}_sha256"):
        raise CheckpointError(f"{path}: checksum mismatch; the file is damaged")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_checkpoint(
    ckpt_dir: Path, plan_fingerprint: dict[str, Any] | None = None
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:
    """Load the latest checkpoint, verifying its checksum and (optionally) plan.

    Raises
    ------
    CheckpointError
        If nothing is there, the weights fail their checksum, or the plan differs.
    """
    latest = ckpt_dir / LATEST
    if not latest.exists():
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to resume from")
    try:
        meta = json.loads(latest.read_text())
        data = (ckpt_dir / meta["weights"]).read_bytes()
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{latest}: unreadable ({exc})") from None
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(
            f"{ckpt_dir / meta['weights']}: checksum mismatch; the file is damaged"
        )
    if plan_fingerprint is not None:
        saved = meta.get("plan_fingerprint")
        now = json.loads(json.dumps(plan_fingerprint))
        if isinstance(saved, dict):
            saved = {**_legacy_defaults(now), **saved}
        if saved != now:
            differ = (
                sorted(k for k in now if saved.get(k) != now[k])
                if isinstance(saved, dict)
                else []
            )
            which = (
                ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in differ)
                if differ
                else f"{saved} -> {now}"
            )
            raise CheckpointError(
                f"{latest}: checkpoint was made under a different plan ({which}); "
                "resume with the same plan or start a new run name"
            )
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state, meta


def _legacy_defaults(now: dict[str, Any]) -> dict[str, Any]:
    """The plan defaults of fingerprint keys added after older checkpoints.

    A checkpoint written before a key joined the fingerprint was made under
    that key's default (the key did not exist to be set).
    """
    from common.config import RESUME_STRATEGY_KEYS, Plan

    fields = Plan.model_fields
    return {k: fields[k].default for k in RESUME_STRATEGY_KEYS if k in now}


def load_server_state(ckpt_dir: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The server optimiser state saved with a checkpoint (empty if none).

    Raises
    ------
    CheckpointError
        If the file is missing or fails its checksum.
    """
    loaded = _load_extra(ckpt_dir, meta, "server_state") or {}
    return {k: v.numpy() for k, v in loaded.items()}


def load_ema(
    ckpt_dir: Path, meta: dict[str, Any]
) -> OrderedDict[str, torch.Tensor] | None:
    """The moving average saved with a checkpoint (None if it has none).

    Raises
    ------
    CheckpointError
        If the file is missing or fails its checksum.
    """
    loaded = _load_extra(ckpt_dir, meta, EMA_KEY)
    return None if loaded is None else OrderedDict(loaded)


INITIAL_KEY = "initial_checkpoint"


def load_initial(
    path: Path, task: str, model: str
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:
    """The weights of an ``initial-checkpoint`` and the provenance to record.

    ``path`` is a checkpoint folder (``kidneyfl pretrain``'s output, or any
    run's ``final/``). Its checksum is verified, and it must be of the plan's
    task and model. The provenance (``initial_checkpoint`` in every later
    sidecar) is the weights' SHA-256, the dataset and its licence when the
    checkpoint was pretrained, and the path.

    Raises
    ------
    CheckpointError
        If it is missing, damaged, or of another task or model.
    """
    state, meta = load_checkpoint(Path(path))
    plan = meta.get("plan", {})
    theirs = (plan.get("task", "segmentation"), meta.get("model", plan.get("model")))
    if theirs != (task, model):
        raise CheckpointError(
            f"{path}: initial checkpoint is {theirs[0]} with model {theirs[1]}, the "
            f"plan is {task} with model {model}; pretrain with the plan's model or "
            "set initial-checkpoint to a matching one"
        )
    pre = meta.get("pretrained", {})
    info = {
        "path": str(Path(path).resolve()),
        "sha256": meta["sha256"],
        "dataset": pre.get("dataset", "a federated run"),
        "licence": pre.get("licence", "-"),
    }
    return state, info
