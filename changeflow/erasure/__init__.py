"""Erasure of a person from every projection the pipeline feeds, tracked until each one confirms
(README "Erasure"): ``run`` carries a request out, ``tracking`` keeps it in the reports' home store, ``api`` is
the worker endpoint's side. What every write path consults is below, in ``streams.erasure`` and
``streams.suppression``."""
