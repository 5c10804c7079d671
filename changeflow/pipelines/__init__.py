"""Pipelines as configuration: one YAML file declares sources, entities, field policy and stores.

The lowest layer with ``streams`` and ``schemas`` above it: it imports nothing of changeflow's.
"""
