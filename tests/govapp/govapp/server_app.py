"""Sends two queries to every site and writes the replies to $GOV_OUT."""

import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Round 1: a plain query; round 2: one whose reply breaks the contract."""
    want = int(os.environ.get("GOV_NODES", "2"))
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < want and time.monotonic() < deadline:
        time.sleep(1)
        nodes = list(grid.get_node_ids())
    out = {}
    for phase, cfg in (("plain", {}), ("extra", {"extra-metric": 1})):
        msgs = [
            Message(
                RecordDict({"config": ConfigRecord(cfg)}),
                dst_node_id=n,
                message_type="query",
            )
            for n in nodes
        ]
        replies = grid.send_and_receive(msgs, timeout=60)
        out[phase] = [
            {"error": r.error.reason}
            if r.has_error()
            else {
                "metrics": dict(r.content.metric_records["metrics"]),
                "site": dict(r.content.config_records.get("site", {})),
            }
            for r in replies
        ]
    Path(os.environ["GOV_OUT"]).write_text(json.dumps(out))
