"""Redis cache projection: ``<prefix>:<id>`` holds the JSON of the current row.

Every write goes through one Lua compare-and-set per batch: a record is applied only if its version is
higher than the one stored for that key in the ``changeflow:versions`` hash. A delete removes the key
but leaves its version there (a versioned tombstone), so a late, older update cannot bring the row
back. Versions are compared as zero-padded decimal strings because Lua numbers are doubles and a
MongoDB cluster-time version exceeds 2^53.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis

from sinks.base import RetriableSinkError, fill_partials
from streams import json
from streams.entities import ENTITIES
from streams.records import ChangeRecord

if TYPE_CHECKING:
    from changeflow.settings import Settings

VERSIONS_KEY = "changeflow:versions"
APPLIED_KEY = "changeflow:applied"

# KEYS[1] = versions hash, KEYS[2] = applied-through hash, KEYS[3..] = row keys.
# ARGV = entity name then, per row key, (padded version, value; "" means delete).
APPLY_IF_NEWER = """
local vh = KEYS[1]
local applied = 0
for i = 3, #KEYS do
  local base = (i - 3) * 2
  local ver = ARGV[base + 2]
  local val = ARGV[base + 3]
  local cur = redis.call('HGET', vh, KEYS[i])
  if (not cur) or cur < ver then
    redis.call('HSET', vh, KEYS[i], ver)
    if val == '' then
      redis.call('DEL', KEYS[i])
    else
      redis.call('SET', KEYS[i], val)
    end
    applied = applied + 1
  end
  local through = redis.call('HGET', KEYS[2], ARGV[1])
  if (not through) or through < ver then
    redis.call('HSET', KEYS[2], ARGV[1], ver)
  end
end
return applied
"""


def pad(version: int) -> str:
    return f"{version:020d}"


class RedisSink:
    name = "redis"

    def __init__(self, settings: Settings) -> None:
        self.client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        self._script = self.client.register_script(APPLY_IF_NEWER)

    def setup(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise RetriableSinkError(f"redis unavailable: {exc}") from exc

    def fetch_current(self, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        spec = ENTITIES[entity]
        if spec.redis_prefix is None or not keys:
            return {}
        try:
            values = self.client.mget([spec.redis_key(k) for k in keys])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RetriableSinkError(f"redis: {exc}") from exc
        return {k: json.loads(v) for k, v in zip(keys, values, strict=True) if v is not None}

    def write_batch(self, records: Sequence[ChangeRecord]) -> None:
        records = fill_partials(records, self.fetch_current)
        by_entity: dict[str, list[ChangeRecord]] = {}
        for record in records:
            if ENTITIES[record.entity].redis_prefix is not None:
                by_entity.setdefault(record.entity, []).append(record)
        try:
            pipe = self.client.pipeline(transaction=False)
            for entity, group in by_entity.items():
                spec = ENTITIES[entity]
                keys = [VERSIONS_KEY, APPLIED_KEY]
                args: list[str | bytes] = [entity]
                for record in group:
                    keys.append(spec.redis_key(record.key))
                    args.append(pad(record.version))
                    args.append(b"" if record.after is None else json.dumps(record.after))
                self._script(keys=keys, args=args, client=pipe)
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            raise RetriableSinkError(f"redis: {exc}") from exc

    def close(self) -> None:
        self.client.close()
