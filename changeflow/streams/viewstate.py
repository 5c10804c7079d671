"""A view stage's state on local disk: RocksDB (rocksdict), written in atomic batches.

Reads see the batch being built (an ordered overlay), so the join logic (``streams.join``) can read what it
has just written; ``commit`` writes the whole batch, with the input offsets and the outputs it produced, in
one RocksDB write batch. A process killed at any point leaves the state as of its last commit, and the
stage goes on from the offsets stored in it.

Why rocksdict directly and not a Faust table (which keeps its data in the same engine): a fan-out needs a
range scan over one user's orders (Faust's Table API has none, so the orders would be read whole into
memory), and one step must change several keys and the input position atomically (Faust writes each key
to its changelog on its own).
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rocksdict import Options, Rdict, WriteBatch
from sortedcontainers import SortedDict

_GONE = object()


def _prefix_end(prefix: bytes) -> bytes | None:
    """The first key after every key that starts with ``prefix`` (None: no such bound)."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else None


class RocksState:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = Rdict(str(path), Options(raw_mode=True))
        self._overlay: SortedDict = SortedDict()

    # --- the State protocol (streams.join) -----------------------------------------------------------
    def get(self, key: bytes) -> Any:
        if key in self._overlay:
            value = self._overlay[key]
            return None if value is _GONE else value
        raw = self._db.get(key)
        return None if raw is None else pickle.loads(raw)

    def put(self, key: bytes, value: Any) -> None:
        self._overlay[key] = value

    def delete(self, key: bytes) -> None:
        self._overlay[key] = _GONE

    def scan(self, prefix: bytes, after: bytes | None = None) -> Iterator[tuple[bytes, Any]]:
        """Keys starting with ``prefix`` (after ``after``, if given), in order, overlay over disk."""
        start = after if after is not None else prefix
        end = _prefix_end(prefix)
        pending = [k for k in self._overlay.irange(minimum=start, maximum=end, inclusive=(True, False))
                   if k.startswith(prefix) and (after is None or k > after)]
        it = self._db.iter()
        it.seek(start)
        i = 0
        while True:
            disk_key: bytes | None = None
            while it.valid():
                k = it.key()
                if not k.startswith(prefix):
                    break
                if (after is not None and k <= after) or k in self._overlay:
                    it.next()
                    continue
                disk_key = k
                break
            over_key = pending[i] if i < len(pending) else None
            if disk_key is None and over_key is None:
                return
            if over_key is not None and (disk_key is None or over_key < disk_key):
                i += 1
                value = self._overlay.get(over_key, _GONE)
                if value is not _GONE:
                    yield over_key, value
                continue
            assert disk_key is not None
            yield disk_key, pickle.loads(it.value())
            it.next()

    # --- batches -------------------------------------------------------------------------------------
    def commit(self) -> None:
        if not self._overlay:
            return
        batch = WriteBatch(raw_mode=True)
        for key, value in self._overlay.items():
            if value is _GONE:
                batch.delete(key)
            else:
                batch.put(key, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        self._db.write(batch)
        self._overlay.clear()

    def rollback(self) -> None:
        self._overlay.clear()

    @property
    def dirty(self) -> int:
        return len(self._overlay)

    def empty(self) -> bool:
        it = self._db.iter()
        it.seek_to_first()
        return not it.valid() and not self._overlay

    def wipe(self) -> None:
        """Forget everything (a new owner whose state is not the last owner's): rebuilt from the topics."""
        self._overlay.clear()
        self._db.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._db = Rdict(str(self.path), Options(raw_mode=True))

    def close(self) -> None:
        self._overlay.clear()
        self._db.close()


class Prefixed:
    """One view's part of a shared ``RocksState``: every key under the view's own prefix, so the views of a
    pipeline share one database, one commit and one set of input offsets."""

    def __init__(self, state: RocksState, prefix: bytes) -> None:
        self._state = state
        self._prefix = prefix

    def get(self, key: bytes) -> Any:
        return self._state.get(self._prefix + key)

    def put(self, key: bytes, value: Any) -> None:
        self._state.put(self._prefix + key, value)

    def delete(self, key: bytes) -> None:
        self._state.delete(self._prefix + key)

    def scan(self, prefix: bytes, after: bytes | None = None) -> Iterator[tuple[bytes, Any]]:
        n = len(self._prefix)
        for key, value in self._state.scan(self._prefix + prefix, None if after is None else self._prefix + after):
            yield key[n:], value
