"""Writes a marker when imported; answers a query with one allowed metric."""

import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

_MARKERS = os.environ.get("GOV_MARKER_DIR")
if _MARKERS:
    Path(_MARKERS).mkdir(parents=True, exist_ok=True)
    (Path(_MARKERS) / f"imported-{os.getpid()}").write_text("bundle code ran\n")

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """n-cases only; with config extra-metric=1 also a metric off the contract."""
    metrics = {"n-cases": 3.0}
    if int(msg.content["config"].get("extra-metric", 0)):
        metrics["case-ids"] = 12345.0
    name = Path(str(context.node_config.get("site-config", "x"))).stem
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": name})}
    )
    return Message(content=content, reply_to=msg)
