"""Request and response bodies: compression, multipart forms and external data tables."""

from __future__ import annotations

import gzip
import importlib
import re
import sys
import zlib
from typing import Any

from changeflow.deploy.clickhouse_server.engine import ExternalTable
from changeflow.deploy.clickhouse_server.errors import ClickHouseError, ch_error
from changeflow.deploy.clickhouse_server.lexer import _IDENT_RE, tokens


def _optional(module: str) -> Any:
    """Optional codecs: clickhouse-connect offers what it has installed, we accept what we have."""
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - depends on the environment
        return None


lz4_frame: Any = _optional("lz4.frame")
zstd: Any = _optional("compression.zstd" if sys.version_info >= (3, 14) else "backports.zstd")
brotli: Any = _optional("brotli")


DEFAULT_MAX_BODY = 256 << 20


def too_large(what: str, limit: int) -> ClickHouseError:
    return ch_error(229, "QUERY_IS_TOO_LARGE", f"{what} exceeds the server's limit of {limit} bytes")


def _bounded(step: Any, data: bytes, limit: int) -> bytes:
    """Run a streaming decompressor ``step(chunk, max_length)`` without ever holding more than ``limit``."""
    out = bytearray()
    while True:
        part, data, more = step(data, limit + 1 - len(out))
        out += part
        if len(out) > limit:
            raise too_large("Decompressed request body", limit)
        if not more:
            return bytes(out)


def decompress_body(data: bytes, encoding: str, limit: int = DEFAULT_MAX_BODY) -> bytes:
    """Request ``Content-Encoding``: clickhouse-connect sends one lz4/zstd frame per block.

    Decompression stops as soon as the output would exceed ``limit``: a small bomb cannot fill memory.
    """
    encoding = encoding.strip().lower()
    if not encoding or encoding == "identity" or not data:
        return data
    try:
        if encoding == "lz4" and lz4_frame is not None:
            frames: list[Any] = [None]

            def lz4_step(chunk: bytes, room: int) -> tuple[bytes, bytes, bool]:
                if frames[0] is None:
                    frames[0] = lz4_frame.LZ4FrameDecompressor()
                dec = frames[0]
                out = dec.decompress(chunk, max_length=room)
                if dec.eof:
                    frames[0] = None
                    rest = dec.unused_data or b""
                    return out, rest, bool(rest)
                return out, b"", bool(out) and not dec.needs_input

            return _bounded(lz4_step, data, limit)
        if encoding == "zstd" and zstd is not None:
            zdecs: list[Any] = [zstd.ZstdDecompressor()]

            def zstd_step(chunk: bytes, room: int) -> tuple[bytes, bytes, bool]:
                dec = zdecs[0]
                out = dec.decompress(chunk, max_length=room)
                if dec.eof:
                    rest = dec.unused_data
                    zdecs[0] = zstd.ZstdDecompressor()
                    return out, rest, bool(rest)
                return out, b"", not dec.needs_input

            return _bounded(zstd_step, data, limit)
        if encoding in ("gzip", "x-gzip", "deflate"):
            wbits = 31 if encoding != "deflate" else 15
            zdec = zlib.decompressobj(wbits)

            def zlib_step(chunk: bytes, room: int) -> tuple[bytes, bytes, bool]:
                out = zdec.decompress(chunk, room)
                rest = zdec.unconsumed_tail
                if zdec.eof:
                    if encoding != "deflate" and zdec.unused_data:  # concatenated gzip members
                        raise ValueError("concatenated gzip members are not supported")
                    return out, b"", False
                return out, rest, bool(rest) or bool(out)

            result = _bounded(zlib_step, data, limit)
            if not zdec.eof:
                raise ValueError("truncated body")
            return result
        if encoding == "br" and brotli is not None:
            out = bytes(brotli.decompress(data))  # no bounded API in every brotli release: check after
            if len(out) > limit:
                raise too_large("Decompressed request body", limit)
            return out
    except ClickHouseError:
        raise
    except Exception as exc:
        raise ch_error(432, "UNKNOWN_CODEC", f"Cannot decompress {encoding} request body: {exc}") from None
    raise ch_error(432, "UNKNOWN_CODEC", f"Unknown HTTP content encoding '{encoding}'")


def compress_body(data: bytes, accept: str) -> tuple[bytes, str | None]:
    """Pick the client's first offered encoding that we have, in its order of preference."""
    for raw in accept.split(","):
        enc = raw.split(";")[0].strip().lower()
        if enc == "lz4" and lz4_frame is not None:
            return lz4_frame.compress(data), enc
        if enc == "zstd" and zstd is not None:
            return bytes(zstd.compress(data)), enc
        if enc == "gzip":
            return gzip.compress(data, compresslevel=3), enc
        if enc == "deflate":
            return zlib.compress(data, 3), enc
        if enc == "br" and brotli is not None:
            return bytes(brotli.compress(data, quality=3)), enc
    return data, None


def content_type(fmt: str) -> str:
    upper = fmt.upper()
    if upper.startswith(("TABSEPARATED", "TSV")):
        return "text/tab-separated-values; charset=UTF-8"
    if upper.startswith("CSV"):
        return "text/csv; charset=UTF-8; header=absent"
    if upper.startswith("JSON"):
        return "application/json; charset=UTF-8"
    if upper.startswith(("NATIVE", "ROWBINARY", "PARQUET", "ARROW", "ORC", "AVRO", "MSGPACK", "PROTOBUF")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FORMAT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")

# -- multipart bodies and external data ---------------------------------------------------------------

_BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_DISPOSITION_PARAM_RE = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, bytes], dict[str, tuple[str, bytes]]]:
    """``multipart/form-data``: plain fields (query, ``param_*``, settings) and uploaded files by field name.

    clickhouse-connect sends one once bound parameters exceed 4,096 URL-encoded characters, and for
    external data; curl ``-F`` too. A file part is one whose disposition names a ``filename``.
    """
    match = _BOUNDARY_RE.search(content_type)
    if match is None:
        raise ch_error(36, "BAD_ARGUMENTS", "multipart/form-data request without a boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    fields: dict[str, bytes] = {}
    files: dict[str, tuple[str, bytes]] = {}
    pos = body.find(delimiter)
    if pos < 0:
        raise ch_error(36, "BAD_ARGUMENTS", "Malformed multipart/form-data body: no boundary line")
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return fields, files
        pos += 2 if body.startswith(b"\r\n", pos) else 1 if body.startswith(b"\n", pos) else 0
        head_end, sep = body.find(b"\r\n\r\n", pos), 4
        if head_end < 0:
            head_end, sep = body.find(b"\n\n", pos), 2
        end = body.find(b"\r\n" + delimiter, head_end + sep) if head_end >= 0 else -1
        if end < 0:
            raise ch_error(36, "BAD_ARGUMENTS", "Malformed multipart/form-data body: truncated part")
        name, filename = None, None
        for line in body[pos:head_end].decode("utf-8", "replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() != "content-disposition":
                continue
            for pname, quoted, bare in _DISPOSITION_PARAM_RE.findall(value):
                text = quoted.replace('\\"', '"').replace("%22", '"') if quoted else bare.strip()
                if pname.lower() == "name":
                    name = text
                elif pname.lower() == "filename":
                    filename = text
        content = body[head_end + sep : end]
        if name is not None:
            if filename is not None:
                files[name] = (filename, content)
            else:
                fields[name] = content
        pos = end + 2


def external_tables(files: dict[str, tuple[str, bytes]], params: dict[str, str]) -> list[ExternalTable]:
    """Each uploaded file as ClickHouse takes it: ``<name>_structure`` ("a UInt8, b String") or
    ``<name>_types`` ("UInt8,String": columns _1, _2...), ``<name>_format`` (TabSeparated by default)."""
    tables = []
    for name, (_filename, data) in files.items():
        if not _IDENT_RE.match(name):
            raise ch_error(36, "BAD_ARGUMENTS", f"Invalid external table name '{name}'")
        structure = params.get(f"{name}_structure")
        types = params.get(f"{name}_types")
        if not structure and types:
            structure = ", ".join(f"_{i} {t.strip()}" for i, t in enumerate(_split_top(types), 1))
        if not structure:
            raise ch_error(
                36,
                "BAD_ARGUMENTS",
                f"Neither structure nor types have not been provided for external table {name}. "
                f"Use fields {name}_structure or {name}_types to do so.",
            )
        fmt = params.get(f"{name}_format") or "TabSeparated"
        if not _FORMAT_RE.match(fmt):
            raise ch_error(73, "UNKNOWN_FORMAT", f"Unknown format {fmt}")
        _check_structure(structure)
        tables.append(ExternalTable(name, structure, fmt, data))
    return tables


def _split_top(text: str) -> list[str]:
    """``UInt8,Tuple(a UInt8, b String)`` -> the two types: commas inside brackets do not split."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [t for t in out if t.strip()]


def _check_structure(structure: str) -> None:
    """A column list goes into our own DDL: it may not close the bracket or add a statement or clause."""
    buf = structure.encode()
    depth = 0
    for tok in tokens(buf):
        text = buf[tok.start : tok.end]
        if tok.kind == "punct" and text in (b"(", b"["):
            depth += 1
        elif tok.kind == "punct" and text in (b")", b"]"):
            depth -= 1
        if depth < 0 or (tok.kind == "punct" and text == b";"):
            raise ch_error(62, "SYNTAX_ERROR", f"Invalid external table structure: {structure[:200]}")
    if depth != 0 or buf.count(b"/*") or buf.count(b"--"):
        raise ch_error(62, "SYNTAX_ERROR", f"Invalid external table structure: {structure[:200]}")


# -- streamed responses ------------------------------------------------------------------------------


class StreamCompressor:
    """A response ``Content-Encoding`` applied block by block, each block flushed as it leaves."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._head = b""
        if encoding == "lz4":
            self._c: Any = lz4_frame.LZ4FrameCompressor(auto_flush=True)
            self._head = self._c.begin()
        elif encoding == "zstd":
            self._c = zstd.ZstdCompressor()
        elif encoding in ("gzip", "deflate"):
            self._c = zlib.compressobj(3, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
        elif encoding == "br":
            self._c = brotli.Compressor(quality=3)
        else:
            raise ValueError(encoding)

    @staticmethod
    def pick(accept: str) -> str | None:
        for raw in accept.split(","):
            enc = raw.split(";")[0].strip().lower()
            if (enc == "lz4" and lz4_frame is not None) or (enc == "zstd" and zstd is not None):
                return enc
            if enc in ("gzip", "deflate") or (enc == "br" and brotli is not None):
                return enc
        return None

    def compress(self, data: bytes) -> bytes:
        head, self._head = self._head, b""
        if self.encoding == "lz4":
            return head + self._c.compress(data)
        if self.encoding == "zstd":
            return bytes(self._c.compress(data, zstd.ZstdCompressor.FLUSH_BLOCK))
        if self.encoding == "br":
            return bytes(self._c.process(data)) + bytes(self._c.flush())
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        head, self._head = self._head, b""
        if self.encoding == "lz4":
            return head + self._c.flush()
        if self.encoding == "zstd":
            return bytes(self._c.flush())
        if self.encoding == "br":
            return bytes(self._c.finish())
        return self._c.flush()
