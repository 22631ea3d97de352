"""What the consortium sees of a run, none of it importing Flower.

The round record (``round_record``), ``metrics.jsonl`` and the summary
(``metrics_log``), the terminal (``console``), ``status.json`` (``status``),
the report (``html``, ``figures``, ``plots``, ``live_report``), TensorBoard
events and the coordinator's view of its sites (``site_status``).
"""
