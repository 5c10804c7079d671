"""The commerce example pipeline, compiled as the decode stage compiles it, for decoder tests."""

from __future__ import annotations

from changeflow.pipelines.load import load
from changeflow.pipelines.transform import compile_pipeline

COMMERCE = load()
POSTGRES_ENTITIES = compile_pipeline(COMMERCE, "postgres")
MONGODB_ENTITIES = compile_pipeline(COMMERCE, "mongodb")
