"""Settings of Flower's own processes that both the site and the coordinator set."""

from typing import Final

# Flower's documented knob for how often a SuperExec asks for new tasks
# (default 1 s). Every message waits for it once, so the site's and the
# coordinator's processes set 0.2 s unless the operator set their own value;
# the cost is one loopback request every 0.2 s.
SUPEREXEC_POLL_ENV: Final = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S: Final = "0.2"
