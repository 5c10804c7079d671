"""ClickHouse's HTTP interface in front of chdb, the ClickHouse engine embedded in a Python process.

No ClickHouse server installs on these machines, but PyPI's ``chdb`` is the real engine, and only
one process may open its data directory. This server owns that directory and speaks enough of
ClickHouse's HTTP protocol that ``clickhouse-connect`` (and curl) work unchanged, exactly as they do
against a real server, so the sinks and reports never know the difference:

* ``GET|POST /`` with the query in the ``query`` URL parameter and/or the body (joined by a newline,
  as ClickHouse does); ``GET`` is read-only, as on a real server. ``/ping`` answers ``Ok.``.
* ``database``, ``default_format``, ``session_id``, ``query_id``, credentials (URL, ``X-ClickHouse-*``
  headers or Basic auth), ``param_<name>`` bindings (chdb binds ``{name:Type}`` natively, with the
  same escaped-text parsing as the server) and any other URL parameter as a query setting.
* Inserts ``INSERT INTO t [(cols)] FORMAT <fmt>\\n<data>`` (Native from clickhouse-connect, any other
  input format from curl) and ``INSERT ... VALUES`` run as the engine's own ``INSERT ... FROM INFILE`` of
  a private spool file (tmpfs, 0600, removed afterwards; ``Spool``), parsed by the engine's input formats
  without re-encoding. Not chdb's streaming ``send_insert``: it reports success for a block the engine
  refused after parsing it (a CHECK constraint, a materialized view's error), so the rows were lost.
* Request bodies in lz4 (clickhouse-connect's default), zstd, gzip, deflate or br; responses
  compressed with the first ``Accept-Encoding`` we support unless ``enable_http_compression=0``
  (its default is 1 in this engine version, as on a current server).
* Errors as ``Code: N. DB::Exception: ... (NAME) (version ...)`` with the HTTP status ClickHouse uses
  and the ``X-ClickHouse-Exception-Code`` header, so clients raise their usual exceptions.
* ``multipart/form-data`` bodies (query and ``param_*`` as form fields, as clickhouse-connect sends them past
  4,096 URL-encoded characters of parameters) and external data (uploaded files with ``<name>_structure`` /
  ``<name>_types`` / ``<name>_format``, queried as temporary tables of the request's connection).
* ``SELECT`` results streamed block by block (chunked) in formats whose blocks concatenate; an error after
  the first block in ClickHouse's mid-stream framing (``X-ClickHouse-Exception-Tag``); ``wait_end_of_query=1``
  buffers the whole result first. SQL may hold any bytes (not only UTF-8).

chdb opens one engine per process and any number of connections to it, each with its own database,
settings and temporary tables, running in parallel (``Engine``): every request leases a connection of its
own (a ``session_id`` keeps one for the session's life), at most ``--max-concurrent-queries`` at once.
HTTP parsing, decompression and compression run in the request threads; chdb releases the GIL while it
executes. A statement whose client closes the connection is cancelled (``ClientWatch``, ``KILL QUERY``).

It behaves like a locked-down ClickHouse server, not like a root shell (ARCHITECTURE.md, "Known traps"):

* a password (``CLICKHOUSE_PASSWORD`` in its environment; it refuses to start without one), checked for
  URL, ``X-ClickHouse-User/Key`` and Basic credentials alike (516 AUTHENTICATION_FAILED);
* fail closed, decided before anything runs: the scanner (``lexer``) reads SQL as the engine's lexer does
  (heredocs, nested comments, quoted identifiers) and refuses what it cannot read (62); one statement per
  request (62 "Multi-statements are not allowed"), at most 256 KiB of SQL (62, ``max_query_size`` fixed),
  known statement kinds only, GET read-only (164 READONLY); access and parser-limit settings (``readonly``,
  ``allow_ddl``, ``profile``, ``max_query_size``, ``max_parser_depth``, file-path settings...) fixed (452,
  or 164 on GET), ``max_execution_time`` capped (452 above the cap, 159 TIMEOUT_EXCEEDED when reached);
* nothing that reaches outside the engine: table functions and engines other than an allow-list, files,
  dictionary sources other than local tables, ``SYSTEM``, ``KILL``, ``BACKUP``/``RESTORE``, access
  management (497 ACCESS_DENIED), ``INTO OUTFILE`` (358), ``FROM INFILE`` (78), ``ATTACH ... FROM`` a
  path (481). The token guard (``guard``) reads every statement; only a statement it passed goes to the
  engine's own ``EXPLAIN AST`` (parsed, never executed), whose errors are the answer and whose tree must be
  whole and is checked again (``ast_violation``);
* started as root, it runs as the system user ``changeflow-ch``, which reaches only its own data folder
  (``privileges``);
* no browser: a request with ``Origin`` or a cross-site ``Sec-Fetch-Site`` is refused (403);
* limits: request body and decompressed body (256 MiB each by default), open connections (a bounded
  pool, 202 TOO_MANY_SIMULTANEOUS_QUERIES), and values echoed as headers are validated.

Files, one job each: ``errors`` (ClickHouse's error text), ``lexer`` (scanner), ``guard`` (pure checks),
``engine`` (chdb connections, parse check, spooled inserts), ``sessions``, ``bodies`` (compression, multipart),
``handler`` (HTTP), ``privileges`` (dropping root), ``__main__`` (arguments, serve loop).
"""
