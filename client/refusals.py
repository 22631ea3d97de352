"""Why a site does not answer, as the coordinator may learn it: a code, a sentence.

Every request a site cannot or will not answer ends in one exception: its own
data unusable, its ledger damaged, its budget spent, its configuration invalid,
a release it chose not to make (:class:`Declined`), or anything unexpected.
:func:`refusal_code` maps the exception to a stable code of
``common.wire.REFUSAL_CODES`` and :func:`public_sentence` to the fixed sentence
sent beside it; the exception's own text, which may hold a path, a case id or a
value from the data, stays in the site's log and audit. Flower-free: the
ClientApp (``client/app.py``) builds the reply.
"""

from __future__ import annotations

from client.data.errors import SiteDataError
from client.privacy.ledger import BudgetExceeded, LedgerError
from client.request_refused import RequestRefused
from common import wire
from common.config import ConfigError


class Declined(RuntimeError):
    """The site chose not to release something (its settings or its floor).

    Parameters
    ----------
    code : str
        A key of ``common.wire.REFUSAL_CODES`` (``not-shared``,
        ``too-few-cases``).
    detail : str
        Why, for the site's own log.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


__all__ = ["REFUSALS", "Declined", "RequestRefused", "public_sentence", "refusal_code"]

# Failures a site reports under their own code; anything else is internal-error.
REFUSALS = (
    Declined,
    RequestRefused,
    SiteDataError,
    LedgerError,
    BudgetExceeded,
    ConfigError,
)


def refusal_code(exc: Exception) -> str:
    """The stable code the coordinator sees for a refusal."""
    if isinstance(exc, (Declined, RequestRefused)):
        return exc.code
    if isinstance(exc, BudgetExceeded):
        return "budget-exceeded"
    if isinstance(exc, LedgerError):
        return "ledger-damaged"
    if isinstance(exc, SiteDataError):
        return "data-unusable"
    if isinstance(exc, ConfigError):
        return "config-invalid"
    return "internal-error"


def public_sentence(exc: Exception) -> str:
    """The sentence beside the code: fixed, except a budget refusal's numbers."""
    if isinstance(exc, BudgetExceeded):
        return str(exc)  # the site's name and its own epsilon numbers only
    return wire.REFUSAL_CODES[refusal_code(exc)]
