"""Synthetic kidney phantoms: simulated hospitals (``profiles``), CT volumes
(``ct``) and the same anatomy as T2-like MR (``mr``) written in KiTS layout
(``kits_writer``), classification slices (``slices``), and the writer behind a
site YAML's ``phantom`` section (``sites``)."""
