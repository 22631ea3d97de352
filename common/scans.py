"""What scans a run trained on, as the checkpoint sidecar records it.

The coordinator reduces the sites' fingerprints (``common/fingerprint.py``:
aggregates only) to two ranges; ``kidneyfl predict`` (``client/scan_check.py``)
refuses a scan far outside them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SEEN_SCANS_KEY = "seen-scans"  # in the checkpoint sidecar


def seen_scans(fingerprints: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    """The coarsest spacing and the smallest extent the sites' scans had.

    ``spacing-q`` is axis-major over (10th, 50th, 90th) percentiles of each
    site's spacing; ``extent-mm`` is each site's median extent per axis.
    """
    sp = np.asarray([f["spacing-q"] for f in fingerprints.values()], dtype=float)
    ext = np.asarray([f["extent-mm"] for f in fingerprints.values()], dtype=float)
    n_q = sp.shape[1] // 3
    return {
        "spacing-mm-max": [float(sp[:, a * n_q + n_q - 1].max()) for a in range(3)],
        "extent-mm-min": [float(ext[:, a].min()) for a in range(3)],
    }
