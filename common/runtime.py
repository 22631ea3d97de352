"""Settings of Flower's own processes that both the site and the coordinator set."""

from typing import Final

# Flower's documented knob for how often a SuperExec asks for new tasks
# (default 1 s). Every message waits for it once, so the site's and the
# coordinator's processes set 0.2 s unless the operator set their own value;
# the cost is one loopback request every 0.2 s.
SUPEREXEC_POLL_ENV: Final = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S: Final = "0.2"

# Flower sends anonymous usage events to telemetry.flower.ai unless this is
# "0", and waits up to 4 s for the send when a process exits. A hospital's
# processes do not phone home: off unless the operator turns it on.
TELEMETRY_ENV: Final = "FLWR_TELEMETRY_ENABLED"


def flower_process_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with kidneyfl's defaults for Flower's processes (operator wins)."""
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S)
    env.setdefault(TELEMETRY_ENV, "0")
    return env
