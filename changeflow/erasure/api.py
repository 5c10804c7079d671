"""The erasure endpoint's calls (``POST /changeflow/erasure/`` on the worker's web port): the same requests as
``changeflow erase`` and ``changeflow erasure status|confirm``, one JSON object each. The worker checks the
bearer token before anything here runs (``worker.ErasureEndpoint``); this module judges the body, which it
refuses whole when it cannot fully check it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from confluent_kafka import KafkaException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from changeflow.erasure import run
from changeflow.reports import home

log = logging.getLogger("changeflow.erasure")

if TYPE_CHECKING:
    from changeflow.pipelines.spec import Pipeline
    from changeflow.settings import Settings

Handler = Callable[[Any], tuple[int, dict[str, Any]]]


class Call(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["erase", "status", "confirm"] = "erase"
    subject: str | None = Field(None, max_length=64)
    id: str | None = Field(None, min_length=1, max_length=1024)
    request: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")
    projection: str | None = Field(None, max_length=128)
    source_deleted: bool = False
    wait_source_s: float = Field(0.0, ge=0, le=3600)


def handler(settings: Settings, pipeline: Pipeline) -> Handler:
    unavailable = (*home.errors(), KafkaException, psycopg.Error, TimeoutError)

    def handle(body: Any) -> tuple[int, dict[str, Any]]:
        try:
            call = Call.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return 400, {"error": f"{where}: {first['msg']}"}
        try:
            if call.action == "erase":
                if call.subject is None or call.id is None:
                    return 400, {"error": "erase needs `subject` and `id`"}
                request = run.erase(settings, pipeline, call.subject, call.id, wait_source_s=call.wait_source_s,
                                    source_deleted=call.source_deleted)
                return 200, run.as_json(request)
            if call.action == "confirm":
                if call.request is None or call.projection is None:
                    return 400, {"error": "confirm needs `request` and `projection`"}
                return 200, run.as_json(run.confirm(settings, pipeline, call.request, call.projection, by="http"))
            return 200, {"requests": [run.as_json(r) for r in run.status(settings, pipeline, call.request)]}
        except run.ErasureError as exc:
            return 409, {"error": str(exc)}
        except unavailable as exc:  # the request stays open: the same call again resumes it
            log.warning("event=erasure_unavailable action=%s error=%s", call.action, type(exc).__name__)
            return 503, {"error": f"{type(exc).__name__}: {str(exc)[:500]}; the request stays open, call again"}

    return handle
