"""The reply wire contract, as the site applies it before anything leaves.

The contract itself lives in ``common/contract.py``, because the coordinator
applies it too (a hostile site would skip the site's check); this module keeps
the site's names for it, so ``client/gate.py`` and the site's tests read as
they did.
"""

from common.contract import (
    ArraySpec,
    ReplyView,
    allowed_metric,
    check_reply,
    expected_arrays,
    leaks,
    max_metric_keys,
)

__all__ = [
    "ArraySpec",
    "ReplyView",
    "allowed_metric",
    "check_reply",
    "expected_arrays",
    "leaks",
    "max_metric_keys",
]
