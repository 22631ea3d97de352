"""Task plug-ins: ``base`` (the ``Task`` seam and ``TaskData``), one package
per task (``segmentation``, ``classification``) and ``registry``
(``get_task``, ``site_task``)."""
