"""Segmentation of kidney, tumour and cyst in 3D CT (KiTS labels): the site's
cases (``cases``), the MONAI pipeline (``pipeline``), the readiness check
(``check``), prediction on a scan (``predict``) and the plug-in (``task``)."""
