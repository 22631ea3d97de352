"""Site-supplied text, made safe to show: the one sanitiser of the reporting side.

Everything a site sends that the coordinator shows is the site's to choose: its
declared name, the names of its metric keys, its refusal reason, its counts. A
hostile or broken site could send terminal escape codes (which recolour,
retitle or rewrite an operator's terminal), carriage returns and backspaces
(which overwrite a line already printed), Unicode bidi overrides (which make a
name read as another), lone surrogates (which no encoder accepts) or 100 kB
strings (which swamp a log line or a figure). :func:`safe_text` is applied
wherever such text reaches the terminal, the logs, ``status.json``,
``metrics.jsonl`` or the report; :func:`safe_record` applies it to a whole
``metrics.jsonl`` entry. Honest names (the site schema allows
``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``) and sentences pass unchanged.

HTML escaping is not done here: ``html.py`` escapes every string it writes,
sanitised or not.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

# A site's name (at most 64 characters in the site schema) or a metric key.
NAME_LIMIT = 100
# A sentence: a refusal reason, a rejection, a status message.
TEXT_LIMIT = 300
# Entries kept of any one mapping or list of a record, and how deep it nests:
# generous for honest records (a fingerprint histogram has 1024 values), a
# bound on what a reply with thousands of keys can make every reader walk.
MAX_ITEMS = 4096
MAX_DEPTH = 8
_MORE = "..."

# Escape sequences whole, so that no parameter bytes are left behind as text:
# string commands (OSC, DCS, SOS, PM, APC) up to their terminator, CSI
# sequences, then any other two-byte escape. C1 forms (0x9b CSI, 0x9d OSC...)
# are single control characters and go with the rest below.
_ESCAPES = re.compile(
    r"\x1b[\]PX^_].*?(?:\x07|\x1b\\|$)"  # OSC, DCS, SOS, PM, APC strings
    r"|\x1b\[[0-?]*[ -/]*[@-~]?"  # CSI (colours, cursor moves, erase)
    r"|\x1b[ -/]*[0-~]?",  # two-byte and nF escapes; a lone ESC
    re.DOTALL,
)


def safe_text(value: Any, limit: int = TEXT_LIMIT) -> str:
    """``value`` as one line of plain, printable text of at most ``limit`` characters.

    Escape sequences are removed whole; tabs, newlines, carriage returns and
    other line or paragraph breaks become spaces; every other character that
    is not printable (C0 and C1 controls, DEL, bidi overrides and isolates
    U+202A-U+202E and U+2066-U+2069, other format characters, lone
    surrogates, private-use and unassigned code points) is dropped. A longer
    result is cut and ends in ``...``. Only a bounded prefix of ``value`` is
    ever read, so a 100 kB string costs no more than a short one.

    Parameters
    ----------
    value : object
        The site's text; anything else is shown through ``str``.
    limit : int
        The most characters returned (at least 4).
    """
    if not isinstance(value, str):
        try:
            value = str(value)
        except Exception:  # noqa: BLE001 - e.g. an int too long to print
            value = f"<{type(value).__name__}>"
    if len(value) <= limit and value.isprintable():
        return value  # the honest case, at C speed
    # Escape sequences may shorten the text; read enough to fill the limit.
    text = _ESCAPES.sub("", value[: 8 * limit + 64])
    text = "".join(
        ch if ch.isprintable() else " " if ch.isspace() else "" for ch in text
    )
    if len(text) > limit:
        text = text[: max(limit - len(_MORE), 1)] + _MORE
    return text


def safe_record(value: Any, depth: int = 0) -> Any:
    """A ``metrics.jsonl`` entry (or any JSON value) that is safe to show.

    Every key becomes a :func:`safe_text` name (:data:`NAME_LIMIT`; two keys
    that clean to the same text stay apart as ``name~2``), every string a
    sentence (:data:`TEXT_LIMIT`); a mapping or list keeps its first
    :data:`MAX_ITEMS` entries and nothing deeper than :data:`MAX_DEPTH`;
    non-finite numbers and integers no float can hold become None, so the
    record stays valid JSON and every number formats. Idempotent, and cheap
    for an honest record.
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        if abs(value) <= 2**53:
            return value
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, str):
        return safe_text(value, TEXT_LIMIT)
    if depth >= MAX_DEPTH:
        return None
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in itertools.islice(value.items(), MAX_ITEMS):
            out[_unique(safe_text(key, NAME_LIMIT), out)] = safe_record(item, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [safe_record(v, depth + 1) for v in value[:MAX_ITEMS]]
    return safe_text(value, TEXT_LIMIT)


def _unique(name: str, taken: dict[str, Any]) -> str:
    """``name``, or ``name~2``, ``name~3``... if a cleaned key already has it."""
    if name not in taken:
        return name
    for n in itertools.count(2):
        tail = f"~{n}"
        candidate = name[: NAME_LIMIT - len(tail)] + tail
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")  # pragma: no cover
