"""The one exception for a request the site will not act on (issue 27).

Its own module so that the ledger (``client/privacy/ledger.py``), the request
guard (``client/request_guard.py``) and the refusal mapping
(``client/refusals.py``) can all raise or map it without importing each other.
"""

from __future__ import annotations


class RequestRefused(RuntimeError):
    """A request the site will not act on: a value it does not trust.

    Raised before anything is calibrated, spent, trained or released.

    Parameters
    ----------
    code : str
        ``request-invalid`` (missing, malformed, non-finite or outside the
        plan's bounds, or a run id reused with another schedule),
        ``limit-exceeded`` (beyond the site's own limits) or ``query-limit``
        (the run's evaluate and query allowance is used up). Each is a key of
        ``common.wire.REFUSAL_CODES``.
    detail : str
        Why, for the site's own log: may name the key and the value sent.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
