"""Synthetic kidney CT phantoms: simulated hospitals (``profiles``), CT volumes
(``ct``) written in KiTS layout (``kits_writer``), classification slices
(``slices``), and the writer behind a site YAML's ``phantom`` section (``sites``)."""
