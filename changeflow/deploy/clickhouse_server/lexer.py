"""A small ClickHouse SQL scanner: tokens, the statement's kind and clauses the HTTP layer needs, quoting."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from changeflow.deploy.clickhouse_server.errors import ClickHouseError, ch_error

# -- the scanner ----------------------------------------------------------------------------------------
# ClickHouse's own lexer (src/Parsers/Lexer.cpp), token for token, where a token can hide or fake another:
# strings with backslash escapes and doubled quotes, backquoted and double-quoted identifiers (the same
# rules), heredoc strings ``$tag$...$tag$``, nested ``/* /* */ */`` comments, ``--``, ``//`` and ``# `` / ``#!``
# comments. Fail closed: what it cannot read the way the engine reads it (an unterminated string or
# comment, a ``$`` that starts no heredoc, a ``#`` that starts no comment, a byte outside printable ASCII
# outside a string, identifier or comment) is a syntax error, never a guess.


@dataclass(frozen=True)
class Token:
    kind: str  # word, string, ident (quoted identifier), number, punct
    start: int
    end: int
    depth: int  # bracket depth at the token


_WORD = re.compile(rb"[A-Za-z_][A-Za-z0-9_$]*")
_NUMBER = re.compile(rb"[0-9][0-9A-Za-z_.]*")
_SPACE = b" \t\r\n\f\v"
# Possessive (no backtracking): a doubled quote is always an escaped quote, as in the engine's lexer.
_QUOTED = {q: re.compile(rb"%s(?:[^%s\\]|\\.|%s%s)*+%s" % (q, q, q, q, q), re.DOTALL) for q in (b"'", b'"', b"`")}
_HEREDOC_TAG = re.compile(rb"\$[A-Za-z0-9_]*\$")
_DOLLAR_WORD = re.compile(rb"\$[A-Za-z0-9_$]*")
# The Unicode spaces the engine's lexer skips like ASCII ones (measured on this chdb: U+0085, U+00A0, U+180E,
# U+2000..U+200B, U+2028, U+2029, U+202F, U+205F, U+3000, U+FEFF; not U+1680), as UTF-8.
_UTF8_SPACE = re.compile(
    rb"\xc2[\x85\xa0]|\xe1\xa0\x8e|\xe2\x80[\x80-\x8b\xa8\xa9\xaf]|\xe2\x81\x9f|\xe3\x80\x80|\xef\xbb\xbf"
)
_PUNCT = frozenset(b"!%&*+,-./:;<=>?@^|~{}")
_WORD_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def lex_error(buf: bytes, at: int, what: str) -> ClickHouseError:
    snippet = buf[at : at + 32].decode("utf-8", "replace").replace("\n", " ")
    return ch_error(62, "SYNTAX_ERROR", f"Syntax error: failed at position {at + 1} ({snippet!r}): {what}")


def tokens(buf: bytes, start: int = 0) -> Iterator[Token]:
    """Lazily, so an INSERT's binary data after its FORMAT clause is never scanned.

    Raises ``SYNTAX_ERROR`` (62) at the first byte it cannot read the way the engine does.
    """
    i, n, depth = start, len(buf), 0
    while i < n:
        c = buf[i]
        if c in _SPACE:
            i += 1
        elif (c in (0x2D, 0x2F) and buf[i + 1 : i + 2] == bytes((c,))) or (
            c == 0x23 and buf[i + 1 : i + 2] in (b" ", b"!")
        ):
            j = buf.find(b"\n", i)
            i = n if j < 0 else j + 1
        elif c == 0x23:  # '#' that starts no comment: the engine's lexer has no such token
            raise lex_error(buf, i, "'#' starts a comment only when followed by a space or '!'")
        elif c == 0x2F and buf.startswith(b"/*", i):  # nested, as the SQL standard and the engine have them
            j, level = i + 2, 1
            while level:
                k = buf.find(b"*/", j)
                if k < 0:
                    raise lex_error(buf, i, "Multiline comment is not closed")
                opened = buf.find(b"/*", j, k + 1)
                if opened >= 0:
                    j, level = opened + 2, level + 1
                else:
                    j, level = k + 2, level - 1
            i = j
        elif c in (0x27, 0x22, 0x60):  # ' " `
            m = _QUOTED[bytes((c,))].match(buf, i)
            if m is None:
                raise lex_error(buf, i, "Unmatched quotes" if c != 0x60 else "Unmatched backquote")
            yield Token("string" if c == 0x27 else "ident", i, m.end(), depth)
            i = m.end()
        elif c == 0x24:  # '$': as the engine decides it
            # A heredoc when the text up to the next '$' appears again later (any text: the engine takes it).
            nxt = buf.find(b"$", i + 1)
            close = buf.find(buf[i : nxt + 1], nxt + 1) if nxt >= 0 else -1
            if close >= 0:
                if _HEREDOC_TAG.fullmatch(buf, i, nxt + 1) is None:  # a tag of other characters: refused
                    raise lex_error(buf, i, "a heredoc tag other than $[A-Za-z0-9_]*$")
                end = close + nxt + 1 - i
                yield Token("string", i, end, depth)
                i = end
            elif i + 1 < n and (buf[i + 1] in _WORD_BYTES):  # a bare word starting with '$' ({$x:Int32})
                m = _DOLLAR_WORD.match(buf, i)
                assert m is not None
                yield Token("word", i, m.end(), depth)
                i = m.end()
            else:  # a lone '$'
                yield Token("punct", i, i + 1, depth)
                i += 1
        elif c in (0x28, 0x5B):  # ( [
            yield Token("punct", i, i + 1, depth)
            depth += 1
            i += 1
        elif c in (0x29, 0x5D):  # ) ]
            depth = max(0, depth - 1)
            yield Token("punct", i, i + 1, depth)
            i += 1
        elif (m := _WORD.match(buf, i)) is not None:
            yield Token("word", i, m.end(), depth)
            i = m.end()
        elif (m := _NUMBER.match(buf, i)) is not None:
            yield Token("number", i, m.end(), depth)
            i = m.end()
        elif c in _PUNCT:
            yield Token("punct", i, i + 1, depth)
            i += 1
        elif (m := _UTF8_SPACE.match(buf, i)) is not None:
            i = m.end()
        else:  # a control byte, or a byte past ASCII outside a string
            raise lex_error(buf, i, f"unexpected byte 0x{c:02x} outside a string, identifier or comment")


def _word(buf: bytes, tok: Token | None) -> str:
    return buf[tok.start : tok.end].decode("ascii").upper() if tok is not None and tok.kind == "word" else ""


@dataclass
class Statement:
    """What the HTTP layer needs to know about one statement before the engine sees it."""

    kind: str = ""
    output_format: str | None = None  # from a trailing FORMAT clause (non-INSERT)
    insert_head: bytes | None = None  # INSERT with inline data: the SQL before FORMAT/VALUES
    insert_format: str | None = None
    data_offset: int = 0
    assignments: list[tuple[str, str]] = field(default_factory=list)  # SET name = value
    use_database: str | None = None


def _data_start(buf: bytes, pos: int) -> int:
    """ClickHouse: data starts after the newline, if there is one, or after all whitespace otherwise."""
    n = len(buf)
    while pos < n and buf[pos] in _SPACE:
        if buf[pos] == 0x0A:
            return pos + 1
        pos += 1
    return pos


def analyze(buf: bytes) -> Statement:
    stream = tokens(buf)
    first = next(stream, None)
    if first is None:
        return Statement()
    # "(SELECT ...) UNION ALL ..." starts with a bracket
    opens_bracket = first.kind == "punct" and buf[first.start : first.end] == b"("
    stmt = Statement(kind="SELECT" if opens_bracket else _word(buf, first))
    kind = stmt.kind
    if kind == "INSERT":
        prev: Token | None = None
        for tok in stream:
            word = _word(buf, tok) if tok.depth == 0 else ""
            if word in ("SELECT", "WITH"):
                return stmt
            if word == "VALUES" and _word(buf, prev) != "FORMAT":
                stmt.insert_head, stmt.insert_format, stmt.data_offset = buf[: tok.start], "Values", tok.end
                return stmt
            if word == "FORMAT":
                name = next(stream, None)
                if name is not None and name.kind == "word":
                    stmt.insert_head = buf[: tok.start]
                    stmt.insert_format = buf[name.start : name.end].decode("ascii")
                    stmt.data_offset = _data_start(buf, name.end)
                    return stmt
            prev = tok
        return stmt
    rest = [t for t in stream if t.depth == 0]
    if kind == "SET":
        stmt.assignments = _assignments(buf, rest)
    elif kind == "USE" and rest:
        stmt.use_database = buf[rest[0].start : rest[-1].end].decode().rstrip(";").strip()
    for i, tok in enumerate(rest[:-1]):
        if _word(buf, tok) != "FORMAT" or rest[i + 1].kind != "word":
            continue
        after = rest[i + 2] if i + 2 < len(rest) else None
        if after is None or buf[after.start : after.end] == b";" or _word(buf, after) == "SETTINGS":
            stmt.output_format = buf[rest[i + 1].start : rest[i + 1].end].decode("ascii")
    return stmt


def _assignments(buf: bytes, toks: list[Token]) -> list[tuple[str, str]]:
    """``SET a = 1, b = 'x'`` -> [(a, "1"), (b, "'x'")], values kept as SQL literals."""
    out: list[tuple[str, str]] = []
    groups: list[list[Token]] = [[]]
    for tok in toks:
        text = buf[tok.start : tok.end]
        if tok.kind == "punct" and text == b",":
            groups.append([])
        elif not (tok.kind == "punct" and text == b";"):
            groups[-1].append(tok)
    for group in groups:
        if len(group) >= 3 and buf[group[1].start : group[1].end] == b"=":
            name = buf[group[0].start : group[0].end].decode()
            value = buf[group[2].start : group[-1].end].decode()
            out.append((name, value))
    return out


def quote_literal(value: str) -> str:
    """Setting values from URLs are text; quoting always is safe (ClickHouse converts them)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _text(buf: bytes, tok: Token) -> str:
    return buf[tok.start : tok.end].decode("utf-8", "replace")


def _name(buf: bytes, tok: Token | None) -> str:
    """A word, or a quoted identifier without its quotes (ClickHouse accepts both as function names)."""
    if tok is None:
        return ""
    if tok.kind == "word":
        return _text(buf, tok)
    if tok.kind == "ident":
        return _text(buf, tok)[1:-1].replace("\\", "")
    return ""


def _is(buf: bytes, tok: Token | None, text: bytes) -> bool:
    return tok is not None and tok.kind == "punct" and buf[tok.start : tok.end] == text
