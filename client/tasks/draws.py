"""Each patient's randomness is its own: per-patient seeds for training draws.

A training dataset's random choices for one patient (a patch's position, a
flip, which of the patient's slices) are seeded from the round's seed, a
stable key of that patient and how many times the patient has been drawn since
the round began, and from nothing else. One shared random stream would instead
hand each patient whatever numbers the patients fetched before it left over,
and MONAI's label-aware crops consume more or fewer numbers depending on a
case's labels, so one patient's presence and labels would change the other
patients' training inputs: a leak channel between patients and a gap in the
argument that DP-SGD bounds one patient's influence (issue 27).

The key is a local string (a case id or a patient id), hashed here; it is never
sent. It must not be the item's index, which shifts when a patient is
added or removed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def key_digest(key: str) -> int:
    """A patient key as a 128-bit integer (SHA-256 prefix), for seeding."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big")


def draw_seed(seed: int, key: int, draw: int) -> int:
    """The seed of one draw: a function of (round seed, patient key, draw) only.

    NumPy's ``SeedSequence`` mixes the three well, so nearby seeds, keys or
    draws give unrelated streams. The result fits MONAI's and torch's seeds
    (below 2**32).
    """
    entropy = [seed % 2**64, key, draw]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


class PatientDraws:
    """Seeds per patient and draw, reset each round by :meth:`reset`.

    Item ``i`` of a training dataset is patient ``keys[i]``. The draw counter
    makes a patient's ``k``-th item of a round differ from its earlier ones
    (augmentation multiplicity and further epochs fetch a patient again).

    The counters live in this process: the datasets are read by a
    ``DataLoader`` without worker processes (``client/train.py``); workers
    would each count from the reset and repeat a patient's draws.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [key_digest(k) for k in keys]
        self.reset(0)

    def __len__(self) -> int:
        return len(self._keys)

    def reset(self, seed: int) -> None:
        """Start a round: its seed, every patient's draw counter at zero."""
        self.seed = seed
        self._counts = [0] * len(self._keys)

    def next(self, i: int) -> int:
        """The seed of patient ``i``'s next draw (and count it)."""
        draw = self._counts[i]
        self._counts[i] += 1
        return draw_seed(self.seed, self._keys[i], draw)
