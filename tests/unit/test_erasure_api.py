"""The erasure endpoint's body, judged before anything runs: what it cannot fully check, it refuses whole."""

from __future__ import annotations

from typing import Any

import pytest

from changeflow.erasure import api
from changeflow.pipelines.load import parse
from changeflow.settings import Settings

PIPELINE = parse("name: shop\nsources: {postgres: {database: shop}}\nentities:\n  users: {table: public.users}\n"
                 "erasure:\n  subjects:\n    user: {entity: users}\n", "shop.yml")


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"subject": "user"}, 400, "erase needs `subject` and `id`"),
    ({"id": "7"}, 400, "erase needs `subject` and `id`"),
    ({"action": "confirm", "request": "0123456789abcdef"}, 400, "confirm needs `request` and `projection`"),
    ({"action": "shred", "subject": "user", "id": "7"}, 400, "action: Input should be 'erase', 'status' or 'confirm'"),
    ({"subject": "user", "id": "7", "force": True}, 400, "force: Extra inputs are not permitted"),
    ({"subject": "user", "id": ""}, 400, "id: String should have at least 1 character"),
    ({"subject": "user", "id": "7" * 1025}, 400, "id: String should have at most 1024 characters"),
    ({"action": "status", "request": "../../etc"}, 400, "request: String should match pattern '^[0-9a-f]{16}$'"),
    ({"subject": "user", "id": "7", "wait_source_s": -1}, 400,
     "wait_source_s: Input should be greater than or equal to 0"),
    (["user", "7"], 400, "body: Input should be a valid dictionary or instance of Call"),
])
def test_a_body_it_cannot_fully_check_is_refused_with_the_reason(body: Any, status: int, error: str) -> None:
    handle = api.handler(Settings(), PIPELINE)
    assert handle(body) == (status, {"error": error})
