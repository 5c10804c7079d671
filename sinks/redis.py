"""Redis cache projection: ``<prefix>:<key>`` holds the JSON of the current row (optionally with a TTL).

Every write goes through one Lua compare-and-set per batch: a record is applied only if its version is
higher than the one stored for that key in the ``<namespace>:versions`` hash. A delete removes the key
but leaves its version there (a versioned tombstone), so a late, older update cannot bring the row
back. Versions are compared as zero-padded decimal strings because Lua numbers are doubles and a
MongoDB cluster-time version exceeds 2^53.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis

from pipelines.spec import EntitySpec, Pipeline
from schemas import json
from sinks.base import RetriableSinkError, Versioned, fill_partials
from streams.records import ChangeRecord

if TYPE_CHECKING:
    from changeflow.settings import Settings

BATCH = 1000

# KEYS[1] = versions hash, KEYS[2] = applied-through hash, KEYS[3..] = row keys.
# ARGV = entity name, TTL in seconds ("" for none), then per row key (padded version, value; "" = delete).
APPLY_IF_NEWER = """
local vh = KEYS[1]
local ttl = tonumber(ARGV[2])
local applied = 0
for i = 3, #KEYS do
  local base = (i - 3) * 2
  local ver = ARGV[base + 3]
  local val = ARGV[base + 4]
  local cur = redis.call('HGET', vh, KEYS[i])
  if (not cur) or cur < ver then
    redis.call('HSET', vh, KEYS[i], ver)
    if val == '' then
      redis.call('DEL', KEYS[i])
    elseif ttl then
      redis.call('SET', KEYS[i], val, 'EX', ttl)
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


class RedisStore:
    name = "redis"

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.versions_key = f"{pipeline.namespace}:versions"
        self.applied_key = f"{pipeline.namespace}:applied"
        self.client = redis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=5)
        self._script = self.client.register_script(APPLY_IF_NEWER)

    # --- the stream ---------------------------------------------------------------------------------
    def setup(self, known: Mapping[str, Any] | None = None) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise RetriableSinkError(f"redis unavailable: {exc}") from exc

    def fetch_current(self, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        spec = self.pipeline.entities[entity]
        if spec.redis is None or not keys:
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
            if self.pipeline.entities[record.entity].redis is not None:
                by_entity.setdefault(record.entity, []).append(record)
        try:
            pipe = self.client.pipeline(transaction=False)
            for entity, group in by_entity.items():
                spec = self.pipeline.entities[entity]
                ttl = spec.redis.ttl_s if spec.redis is not None else None
                keys = [self.versions_key, self.applied_key]
                args: list[str | bytes] = [entity, "" if ttl is None else str(ttl)]
                for record in group:
                    keys.append(spec.redis_key(record.key))
                    args.append(pad(record.version))
                    args.append(b"" if record.after is None else json.dumps(record.after))
                self._script(keys=keys, args=args, client=pipe)
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            raise RetriableSinkError(f"redis: {exc}") from exc

    # --- the tools ----------------------------------------------------------------------------------
    def _rows(self, spec: EntitySpec, keys: list[str]) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        for i in range(0, len(keys), BATCH):
            chunk = keys[i : i + BATCH]
            names = [spec.redis_key(k) for k in chunk]
            pipe = self.client.pipeline(transaction=False)
            pipe.mget(names)
            pipe.hmget(self.versions_key, names)
            values, versions = pipe.execute()
            for key, value, version in zip(chunk, values, versions, strict=True):
                if value is None:
                    continue
                try:
                    row = json.loads(value)
                except ValueError:
                    row = {"<value>": value.decode(errors="replace")}
                yield key, row, None if version is None else int(version)

    def _keys(self, spec: EntitySpec) -> list[str]:
        prefix = f"{spec.redis_prefix}:"
        # Redis MATCH patterns treat * ? [ ] \ specially: a prefix from configuration is escaped.
        pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in prefix) + "*"
        return [n.decode()[len(prefix):] for n in self.client.scan_iter(match=pattern, count=BATCH)]

    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        yield from self._rows(spec, self._keys(spec))

    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Versioned]:
        return {k: Versioned(row, v) for k, row, v in self._rows(spec, keys)}

    def count(self, spec: EntitySpec) -> int:
        return len(self._keys(spec))

    def version_entries(self, spec: EntitySpec, keys: list[str]) -> dict[str, int]:
        raw = self.client.hmget(self.versions_key, [spec.redis_key(k) for k in keys]) if keys else []
        return {k: int(v) for k, v in zip(keys, raw, strict=True) if v is not None}

    def delete(self, spec: EntitySpec, keys: list[str]) -> None:
        # The value only: the version entry stays as a tombstone, as after any delete.
        if keys:
            self.client.delete(*[spec.redis_key(k) for k in keys])

    def drop_versions_above(self, spec: EntitySpec, keys: list[str], position: int) -> list[str]:
        ahead = [k for k, v in self.version_entries(spec, keys).items() if v > position]
        if ahead:
            self.client.hdel(self.versions_key, *[spec.redis_key(k) for k in ahead])
        return ahead

    def applied_through(self) -> dict[str, int]:
        raw = self.client.hgetall(self.applied_key)
        return {k.decode(): int(v) for k, v in raw.items()}

    def close(self) -> None:
        self.client.close()
