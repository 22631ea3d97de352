"""Dataset label values -> kidneyfl's labels (0 background, 1 kidney, 2 tumour,
3 cyst): the map each volume layout yields, and the lookup that applies it.

Label names are matched case-insensitively to common spellings (bg, tumor,
kidney_tumor, kidney_cyst, ...); ``data.label_names`` in the site YAML maps the
others. Errors name the dataset file and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from client.data.errors import SiteDataError
from common.metrics import LABELS

KIDNEYFL_LABELS = {name: value for value, name in LABELS.items()}
# Dataset label names (after norm) that need no data.label_names entry.
_ALIASES = {
    "background": ("background", "bg"),
    "kidney": ("kidney",),
    "tumour": ("tumour", "tumor", "kidney_tumor", "kidney_tumour", "cancer", "mass"),
    "cyst": ("cyst", "kidney_cyst"),
}
_DEFAULT_NAMES = {alias: k for k, names in _ALIASES.items() for alias in names}
# nnU-Net's KiTS21/23 conversion (e.g. Dataset220_KiTS2023) trains on nested
# regions, but its label files keep the KiTS values 0-3; the voxels in "masses"
# that are not "tumor" are the cysts.
_KITS_REGIONS = {"background": [0], "kidney": [1, 2, 3], "masses": [2, 3], "tumor": [2]}
_KITS_REGION_VALUES = {"background": 0, "kidney": 1, "tumor": 2, "masses": 3}


def remap_labels(array: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Map dataset label values to kidneyfl labels with a lookup table.

    Parameters
    ----------
    array : numpy.ndarray
        Label volume; integer, or float holding whole numbers (NIfTI scaling).
    label_map : dict of int to int
        Dataset value -> kidneyfl label, as in :attr:`Discovered.label_map`.

    Returns
    -------
    numpy.ndarray
        Same shape, dtype ``uint8``.

    Raises
    ------
    ValueError
        If the array holds values not in the map, naming them.
    """
    arr = np.asarray(array)
    if not label_map or min(label_map) < 0:
        raise ValueError(f"label map {label_map} needs non-negative dataset values")
    if not np.issubdtype(arr.dtype, np.integer):
        fractional = arr != np.round(arr)
        if fractional.any():
            bad = np.unique(arr[fractional])[:10].tolist()
            raise ValueError(f"label values {bad} are not whole numbers")
    ints = arr.astype(np.int64)
    lut = np.full(max(label_map) + 1, -1, dtype=np.int16)
    lut[list(label_map)] = list(label_map.values())
    out = lut[np.clip(ints, 0, lut.size - 1)]
    out[(ints < 0) | (ints >= lut.size)] = -1  # clipping must not hide them
    if (out < 0).any():
        bad = np.unique(ints[out < 0]).tolist()
        raise ValueError(
            f"label values {bad} are not in the label map {sorted(label_map)}; "
            "map them with data.label_names in the site YAML"
        )
    return out.astype(np.uint8)


def nnunet_labels(
    labels: Any, ds: Path
) -> tuple[list[tuple[str, int]], dict[str, str], list[str]]:
    """(name, value) pairs of nnU-Net's name -> value labels, with region lists."""
    if not isinstance(labels, dict) or not labels:
        raise SiteDataError(
            f'{ds}: "labels" must map names to values, e.g. {{"background": 0, '
            '"kidney": 1}'
        )
    regions = {n: v if isinstance(v, list) else [v] for n, v in labels.items()}
    for name, values in regions.items():
        if not values or not all(type(v) is int and v >= 0 for v in values):
            raise SiteDataError(
                f"{ds}: label {name!r} is {labels[name]!r}; expected a non-negative "
                "integer"
            )
    if {norm(n): sorted(v) for n, v in regions.items()} == _KITS_REGIONS:
        names = [(n, _KITS_REGION_VALUES[norm(n)]) for n in regions]
        note = "nnU-Net KiTS region labels read as KiTS values 0-3 (masses -> cyst)"
        return names, {"masses": "cyst"}, [note]
    names = [(n, v) for n, v in labels.items() if not isinstance(v, list)]
    covered = {v for _, v in names}
    for name, values in regions.items():
        if missing := sorted(set(values) - covered):
            raise SiteDataError(
                f"{ds}: label {name!r} is a region {values} and values {missing} have "
                "no integer label of their own; kidneyfl needs one integer value per "
                "label name (of region labels only the KiTS pattern is known), so "
                "use the dataset's original integer labels"
            )
    return names, {}, []


def build_label_map(
    names: list[tuple[str, int]],
    label_names: dict[str, str] | None,
    source: str,
    defaults: dict[str, str],
) -> dict[int, int]:
    overrides = {}
    for key, target in (label_names or {}).items():
        t = norm(str(target))
        t = "tumour" if t == "tumor" else t
        if t not in KIDNEYFL_LABELS:
            raise SiteDataError(
                f"data.label_names: {key!r} maps to {target!r}; kidneyfl labels "
                f"are {', '.join(KIDNEYFL_LABELS)}"
            )
        overrides[norm(key)] = t
    if unknown := sorted(set(overrides) - {norm(n) for n, _ in names}):
        raise SiteDataError(
            f"data.label_names names {unknown}, which {source} does not define "
            f"(its labels: {', '.join(n for n, _ in names)}); fix the spelling"
        )
    table = {**_DEFAULT_NAMES, **defaults, **overrides}
    out: dict[int, int] = {}
    for name, value in names:
        if (target := table.get(norm(name))) is None:
            raise SiteDataError(
                f"{source}: label {name!r} (value {value}) has no kidneyfl meaning; "
                "add it under data.label_names in the site YAML, e.g. "
                f"label_names: {{{name}: background}} (kidneyfl labels: "
                f"{', '.join(KIDNEYFL_LABELS)})"
            )
        if out.setdefault(value, KIDNEYFL_LABELS[target]) != KIDNEYFL_LABELS[target]:
            raise SiteDataError(
                f"{source}: value {value} gets two kidneyfl labels; fix label_names"
            )
    return out


def norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")
