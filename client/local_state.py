"""What stays at the site: FedBN's normalisation layers and fine-tuned models.

Both live in the site's ``state_dir`` under ``personal/<run>/`` and never leave
the site. Writes are atomic (:mod:`common.atomic`).
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from client.request_guard import run_key
from common.atomic import atomic_write_bytes
from common.config import SiteConfig

log = logging.getLogger(__name__)

NORM_FILE = "norm.pt"
FINE_TUNED_FILE = "fine-tuned.pt"


def personal_dir(site: SiteConfig, run_id: str) -> Path:
    """``<state_dir>/personal/<hash of the run id>``.

    The run id is the coordinator's: it never names a file as given (``..``,
    ``/`` or two ids that clean to the same name), only through its hash
    (:func:`client.request_guard.run_key`). ``run-id.txt`` inside names it.
    """
    folder = Path(site.state_dir) / "personal" / run_key(run_id)
    label = folder / "run-id.txt"
    if not label.exists():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(label, run_id.encode() + b"\n")
    return folder


def _save(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    buf = io.BytesIO()
    torch.save(OrderedDict(state), buf)
    atomic_write_bytes(path, buf.getvalue())


def _load(path: Path) -> OrderedDict[str, torch.Tensor] | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def overlay_local_norm(
    state: Mapping[str, torch.Tensor], site: SiteConfig, run_id: str
) -> OrderedDict[str, torch.Tensor]:
    """The global ``state`` with this site's own normalisation layers, if any.

    Before the site's first FedBN round there is nothing local yet and the
    global (initial) values are used.
    """
    out = OrderedDict(state)
    local = _load(personal_dir(site, run_id) / NORM_FILE)
    if local:
        for key, value in local.items():
            if key in out and out[key].shape == value.shape:
                out[key] = value
    return out


def keep_norm_local(
    trained: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    keys: list[str],
    site: SiteConfig,
    run_id: str,
) -> OrderedDict[str, torch.Tensor]:
    """Save the trained norm layers at the site; return the state to send.

    The reply carries the *received* values for the norm keys, so the norm
    layers never leave the site and any averaging of them is a no-op: only the
    other weights are aggregated.
    """
    _save(personal_dir(site, run_id) / NORM_FILE, {k: trained[k] for k in keys})
    out = OrderedDict(trained)
    for key in keys:
        out[key] = received[key].detach().to("cpu", copy=True).contiguous()
    return out


def save_fine_tuned(
    state: Mapping[str, torch.Tensor], site: SiteConfig, run_id: str
) -> Path:
    """Keep the fine-tuned model at the site; returns its path (local only)."""
    path = personal_dir(site, run_id) / FINE_TUNED_FILE
    _save(path, state)
    log.info("fine-tuned model kept at %s", path)
    return path
