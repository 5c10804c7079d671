"""Incremental maintenance of a view (``pipelines.views.ViewDef``): pure logic over a key-ordered state.

No I/O and no Faust: the view stage (``streams.views``) hands records in and takes pending outputs out; the
state is any ``State`` (on disk: ``streams.viewstate.RocksState``), so every step here is tested directly.

The state, by key prefix (keys are ``tk`` tuples: ordered, so a prefix is a range scan):

- ``R entity key`` → (version, row or None): each entity row the view reads, only the columns it reads; a
  delete stays as a versioned None, so a late older change never brings the row back.
- ``X alias fk key`` → the reverse index of lookup ``alias``: left-side row ``key`` points at ``fk``. It is
  kept from the state's own old row, never from ``before``: with ``REPLICA IDENTITY DEFAULT`` PostgreSQL
  sends no old non-key values (DESIGN.md, joins).
- ``J alias fk`` → a fan-out job with its cursor: every left-side row pointing at ``fk`` must be recomputed.
  A job is worked off in bounded steps between input batches, so one user with 100,000 orders changing
  city neither holds its orders in memory nor stalls other keys; a newer change of the same row restarts it.
- ``D root`` → a root key whose view row must be recomputed.
- ``O root`` → what the view last said for the root: its row (row views) or its contribution (aggregates).
- ``G group`` / ``M group root`` → an aggregate group's state, and each member's inputs (min and max are
  recomputed from the members when the extreme leaves).
- ``P viewkey`` → an output to publish: (version, row or None, ts_ms). Written in the same atomic commit as
  the state that produced it and deleted once Kafka has it, so a crash re-publishes it with the same
  version, never a state older than one already published.
- ``S name`` → the stage's own bookkeeping (the version clock, input offsets).

Why this instead of KIP-213's subscription/response topics: the view's state lives with one owner (the
stage holds a lease per pipeline), so a lookup is a local read and a fan-out a local range scan. The stale
A→B→A hazard that KIP-213's response hash guards against cannot arise: the join result is always computed
from the state at the moment of publishing, never from a response in flight. The view row's version is the
stage's own clock (``S version``), which only grows, because the source LSNs of different rows are no
order for a joined row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import orjson

from changeflow.pipelines.transform import ExpressionError, compile_expression
from changeflow.pipelines.views import FieldDef, ViewDef
from changeflow.streams.keys import key_text
from changeflow.streams.partial import merge_partial
from changeflow.streams.records import ChangeRecord

Row = dict[str, Any]


class State(Protocol):
    def get(self, key: bytes) -> Any: ...
    def put(self, key: bytes, value: Any) -> None: ...
    def delete(self, key: bytes) -> None: ...
    def scan(self, prefix: bytes, after: bytes | None = None) -> Iterator[tuple[bytes, Any]]: ...


def tk(tag: bytes, *parts: str) -> bytes:
    """An order-preserving tuple key: each part's NUL bytes escaped, each part terminated by ``\\x00\\x01``,
    so no part's content can be mistaken for a boundary and ``tk(tag, a)`` is a prefix of ``tk(tag, a, b)``."""
    return tag + b"".join(p.encode().replace(b"\x00", b"\x00\xff") + b"\x00\x01" for p in parts)


def parts(key: bytes) -> list[str]:
    return [p.replace(b"\x00\xff", b"\x00").decode() for p in key[1:].split(b"\x00\x01")[:-1]]


def foreign_key(row: Row | None, on: tuple[str, ...]) -> str | None:
    """The looked-up row's key text from the left row's ``on`` columns (None: no row, or a NULL column:
    nothing to look up, as in SQL)."""
    if row is None:
        return None
    values = [row.get(c) for c in on]
    if any(v is None for v in values):
        return None
    return key_text(values)


def pick(row: Row | None, field: FieldDef) -> Any:
    """A field's value from its row: the column, then nested document keys (a JSON text is parsed)."""
    if row is None:
        return None
    value = row.get(field.column)
    for name in field.nested:
        if isinstance(value, str | bytes):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                return None
        value = value.get(name) if isinstance(value, dict) else None
    if field.nested and field.declared is None and value is not None and not isinstance(value, str):
        return orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)
    return value


class ViewEngine:
    """One view's incremental maintenance over a ``State``."""

    def __init__(self, view: ViewDef, clock: Callable[[], int]) -> None:
        self.view = view
        self._clock = clock
        self._filter = compile_expression(view.filter) if view.filter else None
        reads = view.columns_read()
        self._keep: dict[str, set[str]] = {}
        for alias, cols in reads.items():
            self._keep.setdefault(view.entity_of(alias), set()).update(cols)
        self._lookups_from = {e: [lk for lk in view.lookups if view.entity_of(lk.left) == e]
                              for e in view.entities}
        self._lookups_of = {e: [lk for lk in view.lookups if lk.entity == e] for e in view.entities}
        self.root_key_columns: tuple[str, ...] = ()
        self.filter_errors = 0
        self._ts_ms = 0

    # --- input ---------------------------------------------------------------------------------------
    def apply(self, state: State, record: ChangeRecord) -> bool:
        """Take one canonical record of an entity the view reads; False when it changes nothing the view
        reads (another entity, a late or repeated version, columns the view ignores)."""
        entity = record.entity
        if entity not in self._keep:
            return False
        rkey = tk(b"R", entity, record.key)
        prev = state.get(rkey)
        if prev is not None and record.version < prev[0]:
            return False  # late: a newer change of this row is already in
        old = prev[1] if prev is not None else None
        if entity == self.view.root and record.key_columns and tuple(record.key_columns) != self.root_key_columns:
            self.root_key_columns = tuple(record.key_columns)
            state.put(b"Srootkeys", self.root_key_columns)  # a restarted stage knows them before a root record
        new = self._image(record, old)
        self._ts_ms = max(self._ts_ms, record.ts_ms)
        state.put(rkey, (record.version, new))
        if new == old:
            return False
        for lk in self._lookups_from[entity]:
            was, now = foreign_key(old, lk.on), foreign_key(new, lk.on)
            if was != now:
                if was is not None:
                    state.delete(tk(b"X", lk.alias, was, record.key))
                if now is not None:
                    state.put(tk(b"X", lk.alias, now, record.key), 1)
        if entity == self.view.root:
            state.put(tk(b"D", record.key), 1)
        for lk in self._lookups_of[entity]:
            state.put(tk(b"J", lk.alias, record.key), b"")  # (re)start: every referrer sees the new row
        return True

    def _image(self, record: ChangeRecord, old: Row | None) -> Row | None:
        if record.is_delete or record.after is None:
            return None
        after = merge_partial(old, record.after) if record.partial else record.after
        keep = self._keep[record.entity]
        if record.entity == self.view.root:
            keep = keep | set(record.key_columns)
        return {c: after.get(c) for c in sorted(keep) if c in after}

    # --- work ----------------------------------------------------------------------------------------
    def work(self, state: State, budget: int) -> int:
        """Recompute dirty roots, then advance fan-out jobs by at most ``budget`` referrers, then recompute
        what they made dirty; returns the number of steps taken (0: nothing left to do)."""
        done = self._drain(state)
        steps = 0
        for job, cursor in list(state.scan(b"J")):
            alias, fk = parts(job)
            lk = next(lk for lk in self.view.lookups if lk.alias == alias)
            finished = True
            for xkey, _ in state.scan(tk(b"X", alias, fk), after=cursor or None):
                referrer = parts(xkey)[2]
                if lk.left == "":
                    state.put(tk(b"D", referrer), 1)
                else:
                    state.put(tk(b"J", lk.left, referrer), b"")
                steps += 1
                if steps >= budget:
                    state.put(job, xkey)
                    finished = False
                    break
            if finished:
                state.delete(job)
            if steps >= budget:
                break
        return done + steps + self._drain(state)

    def has_work(self, state: State) -> bool:
        return any(True for _ in state.scan(b"J")) or any(True for _ in state.scan(b"D"))

    def _drain(self, state: State) -> int:
        n = 0
        for dkey, _ in list(state.scan(b"D")):
            root = parts(dkey)[0]
            state.delete(dkey)
            self._recompute(state, root)
            n += 1
        return n

    def joined(self, lookup_row: Callable[[str, str], Row | None], root_row: Row | None) -> Row | None:
        """The view's output for one root row (None: not in the view), given a way to read entity rows."""
        if root_row is None:
            return None
        rows: dict[str, Row | None] = {"": root_row}
        for lk in self.view.lookups:
            fk = foreign_key(rows.get(lk.left), lk.on)
            rows[lk.alias] = lookup_row(lk.entity, fk) if fk is not None else None
        out = {f.name: pick(rows[f.alias], f) for f in self.view.fields}
        if self._filter is not None:
            try:
                if self._filter.evaluate(out) is not True:
                    return None
            except ExpressionError:
                self.filter_errors += 1  # as in SQL: a filter that cannot be decided keeps the row out
                return None
        if not self.view.aggregated:
            for col in self.root_key_columns:
                out.setdefault(col, root_row.get(col))
        return out

    def _row(self, state: State, entity: str, key: str) -> Row | None:
        got = state.get(tk(b"R", entity, key))
        return got[1] if got is not None else None

    def _recompute(self, state: State, root: str) -> None:
        if not self.root_key_columns:
            self.root_key_columns = tuple(state.get(b"Srootkeys") or ())
        out = self.joined(lambda e, k: self._row(state, e, k), self._row(state, self.view.root, root))
        okey = tk(b"O", root)
        if not self.view.aggregated:
            last = state.get(okey)
            if out != last:
                if out is None:
                    state.delete(okey)
                else:
                    state.put(okey, out)
                shown = out if out is not None else last
                self._publish(state, root, out, {c: shown.get(c) for c in self.root_key_columns})
            return
        contribution = None
        group = [out[c] for c in self.view.group_by] if out is not None else []
        # A group is a key in every store, and no store keys on NULL: a row whose group is NULL is left out,
        # like a row the filter leaves out (README "Read models").
        if out is not None and all(v is not None for v in group):
            contribution = (key_text(group), group, {a.field: out[a.field] for a in self.view.aggregates if a.field})
        last = state.get(okey)
        if contribution == last:
            return
        if last is not None:
            self._retract(state, root, last)
        if contribution is not None:
            self._add(state, root, contribution)
            state.put(okey, contribution)
        else:
            state.delete(okey)

    # --- aggregates ----------------------------------------------------------------------------------
    def _add(self, state: State, root: str, contribution: tuple[str, list[Any], Row]) -> None:
        gk, group, inputs = contribution
        g = state.get(tk(b"G", gk)) or {"n": 0, "group": group, "sum": {}, "nn": {}, "min": {}, "max": {}}
        g["n"] += 1
        for a in self.view.aggregates:
            v = inputs.get(a.field) if a.field else None
            if a.fn == "sum" and v is not None:
                g["sum"][a.name] = g["sum"].get(a.name, 0) + v
                g["nn"][a.name] = g["nn"].get(a.name, 0) + 1
            elif a.fn in ("min", "max") and v is not None:
                cur = g[a.fn].get(a.name)
                if cur is None or (v < cur if a.fn == "min" else v > cur):
                    g[a.fn][a.name] = v
        state.put(tk(b"M", gk, root), inputs)
        state.put(tk(b"G", gk), g)
        self._publish(state, gk, self._group_row(g), self._group_key(g))

    def _retract(self, state: State, root: str, contribution: Any) -> None:
        gk, _group, inputs = contribution
        g = state.get(tk(b"G", gk))
        state.delete(tk(b"M", gk, root))
        if g is None:
            return
        g["n"] -= 1
        if g["n"] <= 0:
            state.delete(tk(b"G", gk))
            self._publish(state, gk, None, self._group_key(g))
            return
        stale = False
        for a in self.view.aggregates:
            v = inputs.get(a.field) if a.field else None
            if v is None:
                continue
            if a.fn == "sum":
                g["sum"][a.name] = g["sum"][a.name] - v
                g["nn"][a.name] -= 1
                if g["nn"][a.name] == 0:
                    del g["sum"][a.name], g["nn"][a.name]
            elif a.fn in ("min", "max") and g[a.fn].get(a.name) == v:
                stale = True  # the extreme left: the next one is among the members
        if stale:
            for a in self.view.aggregates:
                if a.fn in ("min", "max"):
                    values = [m[a.field] for _, m in state.scan(tk(b"M", gk)) if m.get(a.field) is not None]
                    if values:
                        g[a.fn][a.name] = min(values) if a.fn == "min" else max(values)
                    else:
                        g[a.fn].pop(a.name, None)
        state.put(tk(b"G", gk), g)
        self._publish(state, gk, self._group_row(g), self._group_key(g))

    def _group_key(self, g: dict[str, Any]) -> Row:
        return dict(zip(self.view.group_by, g["group"], strict=True))

    def _group_row(self, g: dict[str, Any]) -> Row:
        row = dict(zip(self.view.group_by, g["group"], strict=True))
        for a in self.view.aggregates:
            if a.fn == "count":
                row[a.name] = g["n"]
            elif a.fn == "sum":
                row[a.name] = g["sum"].get(a.name)
            else:
                row[a.name] = g[a.fn].get(a.name)
        return row

    # --- after a rebuild -----------------------------------------------------------------------------
    @staticmethod
    def view_key(seen: bytes) -> str:
        return parts(seen)[0]

    def live(self, state: State, view_key: str) -> bool:
        """Whether the state holds a view row under ``view_key`` (a root's output, or a group)."""
        if self.view.aggregated:
            return state.get(tk(b"G", view_key)) is not None
        return state.get(tk(b"O", view_key)) is not None

    def retire(self, state: State, view_key: str, key_row: Row) -> None:
        """Publish the delete of a view row that stores hold and the state has not."""
        self._publish(state, view_key, None, key_row)

    # --- output --------------------------------------------------------------------------------------
    def _publish(self, state: State, view_key: str, row: Row | None, key_row: Row) -> None:
        """Note an output to publish; ``key_row`` holds the view key's columns (a delete's before-image)."""
        last = state.get(b"Sversion") or 0
        version = max(last + 1, self._clock())
        state.put(b"Sversion", version)
        state.put(tk(b"P", view_key), (version, row, self._ts_ms, key_row))

    @staticmethod
    def pending(state: State) -> Iterator[tuple[bytes, str, int, Row | None, int, Row]]:
        """Outputs to publish: (state key, view key, version, row or None for a delete, ts_ms, key columns)."""
        for pkey, (version, row, ts_ms, key_row) in state.scan(b"P"):
            yield pkey, parts(pkey)[0], version, row, ts_ms, key_row

