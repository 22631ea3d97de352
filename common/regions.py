"""KiTS23's nested regions as sets of kidneyfl's label values.

No torch or MONAI here: the coordinator's reporting and the command line
import them, and ``kidneyfl`` should not load a deep-learning stack to parse
its arguments.
"""

from __future__ import annotations

KITS_REGIONS: dict[str, tuple[int, ...]] = {
    "kidney": (1, 2, 3),
    "masses": (2, 3),
    "tumour": (2,),
}
