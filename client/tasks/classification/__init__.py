"""Classification of one kidney CT slice (normal, cyst, tumour, stone): the
slices read, split and loaded (``data``), the readiness check (``check``) and
the plug-in with its loss (``task``)."""
