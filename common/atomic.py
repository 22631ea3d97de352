"""The one way kidneyfl replaces a file: readers see the old or the new one.

Checkpoints, sidecars, ledgers, reports, phantom cases: every file that must
survive a kill mid-write goes through :func:`atomic_write_bytes` (a temporary
file in the same folder, flushed and fsync'ed, renamed over the target, then
the folder fsync'ed so the rename itself survives a power cut).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse to open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: Path, data: bytes, compress: bool = False, compresslevel: int = 6
) -> None:
    """Write ``data`` to ``path`` atomically; ``compress`` gzips it on the way.

    Creates the parent folder. On any error the target is untouched and the
    temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if compress:
                # no name, mtime 0: the same payload gives the same bytes
                with gzip.GzipFile(
                    filename="",
                    mode="wb",
                    fileobj=fh,
                    mtime=0,
                    compresslevel=compresslevel,
                ) as gz:
                    gz.write(data)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text flavour of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, **dumps: Any) -> None:
    """JSON flavour of :func:`atomic_write_bytes` (indented, sorted keys)."""
    options = {"indent": 2, "sort_keys": True} | dumps
    atomic_write_bytes(path, json.dumps(obj, **options).encode("utf-8"))
