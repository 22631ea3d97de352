"""Subgroups for phantom sites, with one effect planted and one not (issue 29).

A phantom site's ``subgroups.csv`` (``client/data/subgroups.py``) gives every
case an age band, a sex and a scanner, so that the demo's fairness table has
something real to find:

- **age band, planted**: among the cases with a tumour, those whose tumour is
  smaller than the site's median tumour get ``70plus``; the other cases get
  ``40to59`` or ``60to69`` at random. Smaller tumours are harder to outline,
  so tumour Dice is lower in ``70plus``: a gap that is really there (the
  planting is by tumour size, not by an age the phantoms do not have);
- **sex, not planted**: ``f`` or ``m`` at random, independent of everything:
  any gap the table reports for sex is noise, and its interval should cover 0;
- **scanner**: the site's phantom profile (one per site), so the scanner
  groups are the sites themselves (the thick-slice noisy profile is harder).

Deterministic for a given folder and seed; written atomically, replaced on
every call (the folder is the phantom writer's own).
"""

from __future__ import annotations

import random
from pathlib import Path

import nibabel as nib
import numpy as np

from client.data.subgroups import SUBGROUPS_CSV, token
from common.atomic import atomic_write_text

TUMOUR = 2


def plant_subgroups(root: Path, profile: str, seed: int = 0) -> Path:
    """Write ``root/subgroups.csv`` for the KiTS-style cases under ``root``."""
    cases = sorted(p for p in Path(root).glob("case_*") if p.is_dir())
    volumes = {}
    for case in cases:
        seg = case / "segmentation.nii.gz"
        if seg.is_file():
            labels = np.asarray(nib.load(str(seg)).dataobj)
            volumes[case.name] = int((labels == TUMOUR).sum())
    with_tumour = [v for v in volumes.values() if v > 0]
    median = float(np.median(with_tumour)) if with_tumour else 0.0
    rng = random.Random(f"{seed}:{Path(root).name}")
    lines = ["case,sex,age,scanner"]
    for case in cases:
        size = volumes.get(case.name, 0)
        if 0 < size < median:
            age = 75
        else:
            age = rng.choice((50, 65))
        sex = rng.choice(("f", "m"))
        lines.append(f"{case.name},{sex},{age},{token(profile)}")
    out = Path(root) / SUBGROUPS_CSV
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
