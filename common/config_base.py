"""What the plan and the site schemas share: the error, list parsing, messages."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration file or plan is invalid; the message says how to fix it."""


def _triple(value: Any, kind: type, name: str) -> tuple:
    """Parse ``"a,b,c"`` (run config has no lists) or a sequence into a 3-tuple."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", ",").split(",") if p]
    else:
        parts = list(value)
    if len(parts) != 3:
        raise ValueError(f"{name} needs three comma-separated numbers, got {value!r}")
    return tuple(kind(p) for p in parts)


def _numbers(value: Any) -> list[str]:
    """``"a,b c"`` (run config has no lists) or a sequence, as its parts."""
    if isinstance(value, str):
        return [p for p in value.replace(" ", ",").split(",") if p]
    return list(value)


def _explain(exc: ValidationError, source: str, plan: bool) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if plan:
            loc = loc.replace("_", "-")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            where = "[tool.flwr.app.config]" if plan else "the site schema"
            msg = f"unknown key; remove it or check the spelling against {where}"
        elif err["type"] == "missing":
            msg = "required key is missing; add it"
        lines.append(f"  - {loc or '(top level)'}: {msg}")
    return "\n".join(lines)
