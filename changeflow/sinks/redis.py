"""Redis cache projection: ``<prefix>:<key>`` holds the JSON of the current row (optionally with a TTL).

Every write goes through one Lua compare-and-set per batch: a record is applied only if its version is
higher than the one stored for that key in the ``<namespace>:versions`` hash. A delete removes the key
but leaves its version there (a versioned tombstone), so a late, older update cannot bring the row
back. Versions are compared as zero-padded decimal strings because Lua numbers are doubles and a
MongoDB cluster-time version exceeds 2^53.

Each key's write runs under ``redis.pcall``: a key whose write fails is reported back by the script (its
position and Redis's error) with its version left as it was, the other keys of the batch are written,
and the runner quarantines the failed record for Redis only. An error that is about the server, not the
key (out of memory, read-only replica, loading, busy, authentication: :data:`SERVER_ERRORS`), fails the
whole batch as before: retried, or fatal.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings

from changeflow.lazy import lazy_import
from changeflow.pipelines.model import ON_REJECT_DOC, OnReject, Strict
from changeflow.pipelines.problems import Problem
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.schemas import json
from changeflow.settings import env_config
from changeflow.sinks.base import FatalSinkError, Rejected, RetriableSinkError, Versioned
from changeflow.streams.records import ChangeRecord
from changeflow.waiting import WaitTimeout, wait_until

if TYPE_CHECKING:
    import redis

    from changeflow.settings import Settings
else:  # the client library is imported on first use, since loading a pipeline imports this module; measured
    # (python -X importtime, `load(examples/commerce/pipeline.yml)`, median of 7 cold runs on the 2-core dev box):
    # 620 ms with redis, httpx and psycopg imported at the tops of the store modules and pipelines.catalog, 373 ms
    # with them lazy (clickhouse_connect, ~95 ms, is lazy too: measured in sinks/clickhouse.py)
    redis = lazy_import("redis")

BATCH = 1000
# How long ``expunge`` waits for Redis to rewrite its append-only file.
EXPUNGE_WAIT_S = 60.0


class RedisSettings(BaseSettings):
    """Where the Redis store connects: ``CHANGEFLOW_REDIS_*``, the native stack's Redis by default."""

    model_config = env_config("CHANGEFLOW_REDIS_")

    host: str = "127.0.0.1"
    port: int = 6379
    # Unset: the one the native stack generated (<state_dir>/secrets/redis_password).
    password: SecretStr | None = None
    db: int = 0


def connection_url(settings: Settings, db: int | None = None) -> str:
    """``redis://`` with the password, when there is one (the URL is a secret: never logged)."""
    own = RedisSettings()
    password = own.password or settings.stored_secret("redis_password")
    auth = f":{quote(password.get_secret_value(), safe='')}@" if password is not None else ""
    return f"redis://{auth}{own.host}:{own.port}/{int(own.db if db is None else db)}"


class RedisConfig(Strict):
    """``entities.<e>.stores.redis``: on by default."""

    enabled: bool = True
    prefix: str | None = Field(None, description="Keys are `<prefix>:<key>`; default: <namespace>:<entity>.")
    ttl_s: int | None = Field(None, gt=0, description="Expire cached rows after this many seconds.")
    on_reject: OnReject = Field("quarantine", description=ON_REJECT_DOC)


def config(spec: EntitySpec) -> RedisConfig | None:
    """The entity's Redis configuration, or None when it does not land in Redis."""
    return cast("RedisConfig | None", spec.store(RedisStore.name))


def key_prefix(spec: EntitySpec) -> str:
    cfg = spec.config.stores.get(RedisStore.name)
    return (cfg.prefix if cfg is not None else None) or f"{spec.namespace}:{spec.name}"


def row_key(spec: EntitySpec, key: str) -> str:
    """The Redis key of the entity's row ``key``: ``<prefix>:<key>``."""
    return f"{key_prefix(spec)}:{key}"

# KEYS[1] = versions hash, KEYS[2] = applied-through hash, KEYS[3..] = row keys.
# ARGV = entity name, TTL in seconds ("" for none), then per row key (padded version, value; "" = delete).
# Returns {applied, {position, error, position, error, ...}}: position 1 is KEYS[3]. A key whose write
# fails keeps its old version, so a newer record still applies and a replay of this one applies if newest.
APPLY_IF_NEWER = """
local vh = KEYS[1]
local ttl = tonumber(ARGV[2])
local applied = 0
local failed = {}
for i = 3, #KEYS do
  local base = (i - 3) * 2
  local ver = ARGV[base + 3]
  local val = ARGV[base + 4]
  local cur = redis.call('HGET', vh, KEYS[i])
  if (not cur) or cur < ver then
    local res
    if val == '' then
      res = redis.pcall('DEL', KEYS[i])
    elseif ttl then
      res = redis.pcall('SET', KEYS[i], val, 'EX', ttl)
    else
      res = redis.pcall('SET', KEYS[i], val)
    end
    if type(res) == 'table' and res.err then
      table.insert(failed, i - 2)
      table.insert(failed, res.err)
    else
      redis.call('HSET', vh, KEYS[i], ver)
      applied = applied + 1
    end
  end
  local through = redis.call('HGET', KEYS[2], ARGV[1])
  if (not through) or through < ver then
    redis.call('HSET', KEYS[2], ARGV[1], ver)
  end
end
return {applied, failed}
"""

# KEYS[1] = versions hash, KEYS[2..] = row keys; ARGV[i - 1] = the padded version a row key keeps ("" for none).
# Removes each row key and its version entry (the memory of a delete included), unless it keeps a version and
# the one stored is at least that. One script: a write between the check and the removal cannot slip in.
# Returns {rows removed, version entries removed}.
FORGET = """
local vh = KEYS[1]
local rows = 0
local entries = 0
for i = 2, #KEYS do
  local keep = ARGV[i - 1]
  local cur = redis.call('HGET', vh, KEYS[i])
  if keep == '' or (not cur) or cur < keep then
    rows = rows + redis.call('DEL', KEYS[i])
    entries = entries + redis.call('HDEL', vh, KEYS[i])
  end
end
return {rows, entries}
"""

# Error prefixes that are about the server, never one key: retried (the first group) or fatal (the second).
SERVER_ERRORS_RETRIABLE = ("OOM", "READONLY", "MISCONF", "BUSY", "LOADING", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN",
                           "NOREPLICAS")
SERVER_ERRORS_FATAL = ("NOAUTH", "WRONGPASS", "NOPERM", "NOSCRIPT")
SERVER_ERRORS = SERVER_ERRORS_RETRIABLE + SERVER_ERRORS_FATAL


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def server_error(message: str) -> Exception | None:
    """The sink error for a Redis error that is about the server (None: it is about the key)."""
    head = message.split(" ", 1)[0].upper()
    if head in SERVER_ERRORS_RETRIABLE:
        return RetriableSinkError(f"redis: {message}")
    if head in SERVER_ERRORS_FATAL:
        return FatalSinkError(f"redis: {message}")
    return None


def script_rejections(group: Sequence[ChangeRecord], result: Any) -> list[Rejected]:
    """The script's answer for one entity's records → the records Redis refused, with its error.

    ``result`` is the script's ``{applied, {position, error, ...}}``, or the exception the pipeline
    returned for the whole call: one about the server raises (retried or fatal); any other script error
    means no key of the call could be judged, which is a failure of the store (fatal), not a rejection.
    """
    if isinstance(result, Exception):
        raise server_error(str(result)) or FatalSinkError(f"redis script failed: {result}")
    failed = result[1] if isinstance(result, list | tuple) and len(result) > 1 else []
    out: list[Rejected] = []
    for j in range(0, len(failed) - 1, 2):
        position, message = int(failed[j]), _text(failed[j + 1])
        error = server_error(message)
        if error is not None:
            raise error
        record = group[position - 1]
        out.append(Rejected(record, f"redis {record.entity} key {record.key!r}: {message}"))
    return out


def pad(version: int) -> str:
    return f"{version:020d}"


def check_prefixes(pipeline: Pipeline) -> list[Problem]:
    """Two entities whose keys could meet: one prefix, or one prefix starting with the other and ``:``."""
    out: list[Problem] = []
    seen: dict[str, str] = {}
    for spec in pipeline.stored_in(RedisStore.name):
        at, mine = f"entities.{spec.name}.stores.redis.prefix", key_prefix(spec)
        for other_prefix, other in seen.items():
            if mine == other_prefix:
                out.append(Problem(at, f"{mine!r} is also entity {other!r}'s prefix; give each entity its own "
                                       f"(default: {spec.namespace}:{spec.name})"))
            elif mine.startswith(other_prefix + ":") or other_prefix.startswith(mine + ":"):
                out.append(Problem(at, f"{mine!r} and entity {other!r}'s {other_prefix!r} share keys; use prefixes "
                                       "where neither starts with the other and ':'"))
        seen.setdefault(mine, spec.name)
    return out


def isolate(spec: EntitySpec, cfg: RedisConfig, tag: str, namespace: str) -> RedisConfig:
    """The configuration of an isolated copy of the entity (the bench's stages): its keys under ``<tag>:``."""
    return cfg.model_copy(update={"prefix": f"{tag}:{key_prefix(spec)}"})


class RedisStore:
    name = "redis"
    config_model = RedisConfig
    check_pipeline = staticmethod(check_prefixes)
    isolate = staticmethod(isolate)

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.versions_key = f"{pipeline.namespace}:versions"
        self.applied_key = f"{pipeline.namespace}:applied"
        self.client = redis.Redis.from_url(connection_url(settings), socket_timeout=30, socket_connect_timeout=5)
        self._script = self.client.register_script(APPLY_IF_NEWER)
        self._forget = self.client.register_script(FORGET)

    # --- the stream ---------------------------------------------------------------------------------
    def setup(self, known: Mapping[str, Any] | None = None) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise RetriableSinkError(f"redis unavailable: {exc}") from exc

    def fetch_current(self, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        spec = self.pipeline.entities[entity]
        if config(spec) is None or not keys:
            return {}
        try:
            values = self.client.mget([row_key(spec, k) for k in keys])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RetriableSinkError(f"redis: {exc}") from exc
        return {k: json.loads(v) for k, v in zip(keys, values, strict=True) if v is not None}

    def write_batch(self, records: Sequence[ChangeRecord]) -> list[Rejected]:
        by_entity: dict[str, list[ChangeRecord]] = {}
        for record in records:
            if config(self.pipeline.entities[record.entity]) is not None:
                by_entity.setdefault(record.entity, []).append(record)
        groups: list[list[ChangeRecord]] = []
        try:
            pipe = self.client.pipeline(transaction=False)
            for entity, group in by_entity.items():
                spec = self.pipeline.entities[entity]
                cfg = config(spec)
                ttl = cfg.ttl_s if cfg is not None else None
                keys = [self.versions_key, self.applied_key]
                args: list[str | bytes] = [entity, "" if ttl is None else str(ttl)]
                for record in group:
                    keys.append(row_key(spec, record.key))
                    args.append(pad(record.version))
                    args.append(b"" if record.after is None else json.dumps(record.after))
                self._script(keys=keys, args=args, client=pipe)
                groups.append(group)
            results = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            raise RetriableSinkError(f"redis: {exc}") from exc
        except redis.ResponseError as exc:
            raise server_error(str(exc)) or FatalSinkError(f"redis: {exc}") from exc
        for result in results:
            if isinstance(result, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)):
                raise RetriableSinkError(f"redis: {result}")
        rejected: list[Rejected] = []
        for group, result in zip(groups, results, strict=True):
            rejected += script_rejections(group, result)
        return rejected

    # --- the tools ----------------------------------------------------------------------------------
    def _rows(self, spec: EntitySpec, keys: list[str]) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        for i in range(0, len(keys), BATCH):
            chunk = keys[i : i + BATCH]
            names = [row_key(spec, k) for k in chunk]
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
        prefix = f"{key_prefix(spec)}:"
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
        raw = self.client.hmget(self.versions_key, [row_key(spec, k) for k in keys]) if keys else []
        return {k: int(v) for k, v in zip(keys, raw, strict=True) if v is not None}

    def delete(self, spec: EntitySpec, keys: list[str]) -> None:
        # The value only: the version entry stays as a tombstone, as after any delete.
        if keys:
            self.client.delete(*[row_key(spec, k) for k in keys])

    def drop_versions_above(self, spec: EntitySpec, keys: list[str], position: int) -> list[str]:
        ahead = [k for k, v in self.version_entries(spec, keys).items() if v > position]
        if ahead:
            self.client.hdel(self.versions_key, *[row_key(spec, k) for k in ahead])
        return ahead

    # --- erasure (changeflow.erasure) ---------------------------------------------------------------
    def keys_where(self, spec: EntitySpec, column: str, values: Sequence[str]) -> list[str]:
        """Redis has no secondary index: every row key of the entity is scanned (SCAN, then MGET in pipelined
        batches) and its JSON compared, so this is O(rows of the entity), not O(matches)."""
        wanted = set(values)
        found: list[str] = []
        if not wanted:
            return found
        for key, row, _version in self.scan(spec):
            if column in row and row[column] is not None and str(row[column]) in wanted:
                found.append(key)
        return sorted(found)

    def _keep_args(self, keys: list[str], keep: Mapping[str, int] | None) -> list[str]:
        return [pad(keep[k]) if keep and k in keep else "" for k in keys]

    def traces(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None = None) -> int:
        """Row keys and version entries (a delete's remembered version included) ``forget`` would remove."""
        total = 0
        for i in range(0, len(keys), BATCH):
            chunk = keys[i : i + BATCH]
            names = [row_key(spec, k) for k in chunk]
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.exists(name)
            pipe.hmget(self.versions_key, names)
            *exists, versions = pipe.execute()
            for found, version, keeps in zip(exists, versions, self._keep_args(chunk, keep), strict=True):
                if keeps and version is not None and version.decode() >= keeps:
                    continue  # the row at the kept version (or newer): stays
                total += int(found) + (version is not None)
        return total

    def forget(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None = None) -> list[str]:
        rows = entries = 0
        for i in range(0, len(keys), BATCH):
            chunk = keys[i : i + BATCH]
            result = self._forget(keys=[self.versions_key, *(row_key(spec, k) for k in chunk)],
                                  args=self._keep_args(chunk, keep))
            rows, entries = rows + int(result[0]), entries + int(result[1])
        done: list[str] = []
        if rows:
            done.append(f"redis {key_prefix(spec)}:*: {rows} row keys deleted")
        if entries:
            done.append(f"redis {self.versions_key}: {entries} version entries removed")
        return done

    def expunge(self, spec: EntitySpec) -> tuple[str, float | None]:
        """Rewrite what is on disk without the forgotten keys, waited for: the append-only file
        (``BGREWRITEAOF``: it still holds the commands that wrote the rows) and the RDB snapshot (``BGSAVE``:
        the last one holds them until the next save), each where the server keeps one."""
        done: list[str] = []
        persistence = cast("dict[str, Any]", self.client.info("persistence"))
        if int(persistence.get("aof_enabled", 0)):
            self.client.bgrewriteaof()

            def rewritten() -> bool:
                now = cast("dict[str, Any]", self.client.info("persistence"))
                return not int(now.get("aof_rewrite_in_progress", 0)) and not int(now.get("aof_rewrite_scheduled", 0))

            try:
                wait_until(rewritten, EXPUNGE_WAIT_S, what="redis BGREWRITEAOF", interval=0.2)
            except WaitTimeout:
                return (f"redis: BGREWRITEAOF started, still running after {EXPUNGE_WAIT_S:.0f} s", EXPUNGE_WAIT_S)
            done.append("append-only file rewritten (BGREWRITEAOF)")
        try:
            snapshots = bool(cast("dict[str, Any]", self.client.config_get("save")).get("save"))
        except redis.ResponseError:  # CONFIG disabled (a managed server): its snapshots are the provider's
            snapshots = False
            done.append("CONFIG is not allowed here: the server's own RDB snapshots are not checked")
        if snapshots:
            before = int(cast("dict[str, Any]", self.client.info("persistence")).get("rdb_last_save_time", 0))
            try:
                self.client.bgsave()
            except redis.ResponseError as exc:  # one already running: it may have started before the forget
                done.append(f"BGSAVE refused ({type(exc).__name__}), retried at the next expunge")
                return "redis: " + "; ".join(done), 60.0

            def saved() -> bool:
                now = cast("dict[str, Any]", self.client.info("persistence"))
                return not int(now.get("rdb_bgsave_in_progress", 0)) and int(now.get("rdb_last_save_time", 0)) >= before

            try:
                wait_until(saved, EXPUNGE_WAIT_S, what="redis BGSAVE", interval=0.2)
            except WaitTimeout:
                return "redis: " + "; ".join([*done, "BGSAVE still running"]), EXPUNGE_WAIT_S
            done.append("RDB snapshot rewritten (BGSAVE)")
        if not done:
            done.append("no append-only file and no RDB snapshots: the data was in memory only, and is gone")
        return "redis: " + "; ".join(done), None

    def applied_through(self) -> dict[str, int]:
        # The client is made without decode_responses, so hash fields come back as bytes.
        raw = cast("dict[bytes, bytes]", self.client.hgetall(self.applied_key))
        return {k.decode(): int(v) for k, v in raw.items()}

    # --- what a reader sees now (the bench's freshness and snapshot figures) -----------------------------
    visibility_poll_s = 0.02  # a lookup costs microseconds: polled every 20 ms, the oldest keys first
    visibility_batch = 2000

    def visible(self, spec: EntitySpec, keys: list[str]) -> set[str]:
        """The keys a reader finds: pipelined EXISTS."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(row_key(spec, key))
        return {k for k, found in zip(keys, pipe.execute(), strict=True) if found}

    def visible_count(self, spec: EntitySpec) -> int:
        return self.count(spec)

    def purge(self) -> list[str]:
        """Exactly the keys this pipeline wrote: every one of them has its version in ``<ns>:versions``
        (tombstones included), so nothing under a shared prefix that another writer owns is touched."""
        done: list[str] = []
        keys = [k for k, _v in self.client.hscan_iter(self.versions_key, count=1000)]
        for i in range(0, len(keys), 1000):
            self.client.delete(*keys[i : i + 1000])
        if keys:
            done.append(f"redis: {len(keys)} keys the pipeline wrote deleted")
        for key in (self.versions_key, self.applied_key):
            if self.client.delete(key):
                done.append(f"redis: {key} deleted")
        return done

    def close(self) -> None:
        self.client.close()
