"""The strategy wrapper: any Flower strategy, with what a consortium needs.

``wrapper`` (``SiteAwareStrategy``), the reply path (``round_sites``,
``reply_filter``, ``guard``, ``updates``, ``capped_mean``, ``replies``), the
weight cap (``influence``) and Flower's strategies by name (``aggregators``).
"""
