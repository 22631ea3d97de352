"""The installed bundle's modules import only from approved source.

After the gate has checked the installed app folder against the approved
bundle (``client.governance.check_installed``), a path hook makes every module
of that folder load through :class:`ApprovedSource`: from its ``.py`` source
only, re-hashed as it is read. A ``.pyc`` forged beside the source, or a module
changed after the folder check (a training round imports modules minutes into
the task), fails to import. Other folders keep Python's own finders.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import sys
from pathlib import Path
from typing import Any


class ApprovedSource(importlib.machinery.SourceFileLoader):
    """A module of the installed bundle, loaded from its source if that is approved.

    The bytes read are the bytes compiled, and they must hash to the approved
    bundle's file: a module changed after the folder was checked (a training
    round imports modules minutes into the task) fails to import. No bytecode
    cache is read or written: a ``.pyc`` in the folder is not part of the
    approved bundle, and whoever can write the folder can forge one.
    """

    def __init__(self, fullname: str, path: str, approved: dict[str, str]) -> None:
        super().__init__(fullname, path)
        self.approved = approved

    def get_code(self, fullname: str) -> Any:
        """The module's code, compiled from its approved source."""
        path = self.get_filename(fullname)
        data = self.get_data(path)
        if hashlib.sha256(data).hexdigest() != self.approved.get(
            os.path.realpath(path)
        ):
            raise ImportError(
                f"module {fullname} of the app bundle is not the approved code",
                name=fullname,
            )
        return self.source_to_code(data, path)


def import_approved(folder: Path, manifest: dict[str, str]) -> None:
    """Import the bundle's modules only through :class:`ApprovedSource`.

    A path hook for the folder and every package in it: only ``.py`` sources
    are found there (no extension module, no bare ``.pyc``), each checked
    against ``manifest`` (path in the bundle to SHA-256) as it is read. Other
    folders keep Python's own finders (the site's libraries and their caches).
    """
    root = os.path.realpath(folder)
    approved = {
        os.path.join(root, *rel.split("/")): sha for rel, sha in manifest.items()
    }

    def loader(fullname: str, path: str) -> ApprovedSource:
        return ApprovedSource(fullname, path, approved)

    def finder(path: str) -> importlib.machinery.FileFinder:
        real = os.path.realpath(path)
        if real != root and not real.startswith(root + os.sep):
            raise ImportError("not the app bundle's folder")  # the next hook's
        return importlib.machinery.FileFinder(path, (loader, [".py"]))

    sys.path_hooks.insert(0, finder)
    for entry in list(sys.path_importer_cache):
        real = os.path.realpath(entry)
        if real == root or real.startswith(root + os.sep):
            del sys.path_importer_cache[entry]
    importlib.invalidate_caches()
