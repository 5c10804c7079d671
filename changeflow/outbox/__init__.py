"""The outbox pattern's runtime: events as consumers read them (``events``), the inbox that applies each one
exactly once (``inbox``), and the outbox table's housekeeping (``prune``). The pipeline file's ``outbox:``
section is ``pipelines.outbox``; the connector's router ``connectors.render``."""
