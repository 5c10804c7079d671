"""What every command works with: the settings and the pipeline, each loaded once per process.

The CLI's callback records ``--pipeline`` (or ``CHANGEFLOW_PIPELINE``); commands call ``settings()`` and
``pipeline()``; lower layers receive both as arguments and never come here.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from changeflow.pipelines.load import load
from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings

_pipeline_path: Path | None = None


def use_pipeline(path: Path | None) -> None:
    global _pipeline_path
    _pipeline_path = path
    pipeline.cache_clear()


@cache
def settings() -> Settings:
    return Settings()


@cache
def pipeline() -> Pipeline:
    """Raises pipelines.load.PipelineError with the file, the path inside it and the fix."""
    return load(_pipeline_path or settings().pipeline)
