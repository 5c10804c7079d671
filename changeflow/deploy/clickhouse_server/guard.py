"""The statement guard: what this server refuses to run for a client, as pure functions (no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from changeflow.deploy.clickhouse_server.errors import ClickHouseError, ch_error
from changeflow.deploy.clickhouse_server.lexer import Statement, Token, _is, _name, _text, _word, tokens

# Statements that produce a result set (ClickHouse sends X-ClickHouse-Format only for these).
RESULT_KINDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK", "VALUES"})
# What a GET request may run: the server treats GET as readonly=2 (reads, SET and USE).
READONLY_KINDS = RESULT_KINDS | {"SET", "USE"}

# -- the statement guard -----------------------------------------------------------------------------
# This server is ours, so it refuses what a real server's default profile refuses a user without
# grants on outside sources: one statement per request, GET read-only, access settings fixed, nothing
# that reaches outside the engine (files, URLs, other servers, programs, the host's SYSTEM commands).
# Two layers: ``guard`` reads every token of the statement (strings and comments are tokens of their
# own, so they can neither hide nor fake a call), then ``ast_violation`` reads the engine's own parse
# tree (``EXPLAIN AST``, which parses without executing) for what spelling might still disguise.

# Table functions that only read the engine's own data or generate rows; every other one is refused.
ALLOWED_TABLE_FUNCTIONS = frozenset(
    {
        "numbers", "numbers_mt", "zeros", "zeros_mt", "generaterandom", "generateseries", "generate_series",
        "primes", "values", "sqlstandardvalues", "view", "viewexplain", "viewifpermitted", "merge", "null",
        "format", "loop", "dictionary", "mergetreeindex", "mergetreeprojection", "mergetreeanalyzeindexes",
        "mergetreeanalyzeindexesuuid", "mergetreecodecblockcounts", "mergetreetextindex", "fuzzjson", "fuzzquery",
    }
)  # fmt: skip
# Table and database engines that keep their data inside the engine's directory.
ALLOWED_ENGINES = frozenset(
    {
        "mergetree", "replacingmergetree", "summingmergetree", "aggregatingmergetree", "collapsingmergetree",
        "versionedcollapsingmergetree", "graphitemergetree", "coalescingmergetree", "memory", "log", "tinylog",
        "stripelog", "null", "set", "join", "buffer", "merge", "dictionary", "view", "materializedview",
        "generaterandom", "alias", "loop", "atomic", "ordinary", "lazy",
    }
)  # fmt: skip
# Refused as a call anywhere, whatever the engine's lists add at start-up (Engine.denied_functions):
# table functions and engines of outside sources, dictionary sources, and scalar functions that read
# files (``file``, ``catboostEvaluate``) or define disks at arbitrary paths (``disk``).
DENIED_FUNCTIONS = frozenset(
    {
        "file", "filecluster", "filesystem", "filelog", "url", "urlcluster", "http", "remote", "remotesecure",
        "cluster", "clusterallreplicas", "distributed", "s3", "s3cluster", "s3queue", "gcs", "oss", "cosn",
        "hdfs", "hdfscluster", "azureblobstorage", "azureblobstoragecluster", "azurequeue", "iceberg",
        "icebergs3", "icebergazure", "iceberghdfs", "iceberglocal", "icebergcluster", "icebergs3cluster",
        "icebergazurecluster", "iceberghdfscluster", "iceberglocalcluster", "deltalake", "deltalakes3",
        "deltalakeazure", "deltalakelocal", "deltalakecluster", "deltalakes3cluster", "deltalakeazurecluster",
        "hudi", "hudicluster", "paimon", "postgresql", "mysql", "sqlite", "jdbc", "odbc", "mongodb", "mongo",
        "redis", "cassandra", "executable", "executablepool", "executable_pool", "input", "python", "eval",
        "arrowstream", "arrowflight", "bigquery", "ytsaurus", "kafka", "rabbitmq", "nats", "hive", "queryrunner",
        "materializedpostgresql", "materializedmysql", "keepermap", "embeddedrocksdb", "yamlregexptree",
        "prometheusquery", "prometheusqueryrange", "disk", "catboostevaluate", "modelevaluate", "replicated",
    }
)  # fmt: skip
# Settings a client may not change (the server's profile fixes them, as constraints do on a real server).
ACCESS_SETTINGS = frozenset(
    {
        "readonly", "allow_ddl", "allow_introspection_functions", "dialect", "profile",
        "max_concurrent_queries_for_user", "max_concurrent_queries_for_all_users", "max_sessions_for_user",
        "input_format_record_errors_file_path",
        "format_schema", "format_schema_source", "format_template_resultset", "format_template_row",
        "output_format_schema", "format_avro_schema_registry_url", "into_outfile_create_parent_directories",
        "s3_allow_server_credentials_in_user_queries", "max_execution_time_leaf",
    }
)  # fmt: skip
# The parser's limits are the server's, fixed at the engine's defaults: a client who could raise them could
# send what the guard refuses to read in full (``max_query_size``) or what the parser cannot bound.
PARSER_SETTINGS = frozenset(
    {
        "max_query_size", "max_parser_depth", "max_parser_backtracks", "max_ast_depth", "max_ast_elements",
        "max_expanded_ast_elements", "max_subquery_depth", "max_recursive_cte_evaluation_depth",
        "implicit_select", "allow_settings_after_format_in_insert", "compatibility",
    }
)  # fmt: skip
FIXED_SETTINGS = ACCESS_SETTINGS | PARSER_SETTINGS
# The most SQL the guard and the engine's parser read: ClickHouse's own max_query_size default. The client's
# SQL is refused beyond it (an INSERT's inline data is data, not SQL, except Values rows: see the handler).
MAX_QUERY_SIZE = 256 << 10
# Statement kinds this server knows how to check; any other first word is refused before the engine sees it.
KNOWN_KINDS = frozenset(
    {
        "SELECT", "WITH", "FROM", "INSERT", "CREATE", "ALTER", "DROP", "TRUNCATE", "OPTIMIZE", "RENAME",
        "EXCHANGE", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK", "USE", "SET", "DELETE",
        "UPDATE", "DETACH", "ATTACH", "UNDROP", "REPLACE", "VALUES",
    }
)  # fmt: skip
ACCESS_KINDS = {  # statement kind -> the grant ClickHouse names when a user lacks it
    "SYSTEM": "SYSTEM",
    "KILL": "KILL QUERY",
    "BACKUP": "BACKUP",
    "RESTORE": "BACKUP",
    "GRANT": "ACCESS MANAGEMENT",
    "REVOKE": "ACCESS MANAGEMENT",
    "MOVE": "ACCESS MANAGEMENT",
}
ACCESS_ENTITIES = frozenset({"USER", "ROLE", "QUOTA", "POLICY", "ROW", "PROFILE", "SETTINGS", "NAMED", "MASKING"})
# Words after which ``name (`` is a table (with its column list), not a call.
_TABLE_NAME_BEFORE = frozenset({"INTO", "TABLE", "EXISTS", "VIEW", "DICTIONARY", "DATABASE"})
# A dictionary source ``CLICKHOUSE(...)`` may name local tables only: no host, no SQL of its own.
_LOCAL_DICTIONARY_KEYS = frozenset({"TABLE", "DB", "DATABASE", "UPDATE_FIELD", "UPDATE_LAG"})

_SOURCE_GRANT = {
    "file": "FILE", "filecluster": "FILE", "filesystem": "FILE", "filelog": "FILE", "disk": "FILE",
    "catboostevaluate": "FILE", "url": "URL", "urlcluster": "URL", "http": "URL", "remote": "REMOTE",
    "remotesecure": "REMOTE", "cluster": "REMOTE", "clusterallreplicas": "REMOTE", "distributed": "REMOTE",
    "mysql": "MYSQL", "postgresql": "POSTGRES", "sqlite": "SQLITE", "jdbc": "JDBC", "odbc": "ODBC",
    "mongodb": "MONGO", "redis": "REDIS", "hdfs": "HDFS", "hdfscluster": "HDFS", "kafka": "KAFKA",
}  # fmt: skip


@dataclass(frozen=True)
class Policy:
    """What the guard allows; ``denied_functions`` is completed from the engine's own lists at start-up."""

    user: str = "default"
    denied_functions: frozenset[str] = DENIED_FUNCTIONS
    allowed_table_functions: frozenset[str] = ALLOWED_TABLE_FUNCTIONS
    allowed_engines: frozenset[str] = ALLOWED_ENGINES
    max_execution_time: float = 300.0


def _grant_name(name: str) -> str:
    low = name.lower()
    if low in _SOURCE_GRANT:
        return _SOURCE_GRANT[low]
    for prefix, grant in (("s3", "S3"), ("azure", "AZURE"), ("hdfs", "HDFS"), ("iceberg", "S3"), ("deltalake", "S3")):
        if low.startswith(prefix):
            return grant
    return name.upper()


def access_denied(user: str, grant: str) -> ClickHouseError:
    text = f"{user}: Not enough privileges. To execute this query, it's necessary to have the grant {grant}"
    return ch_error(497, "ACCESS_DENIED", text)


def source_denied(user: str, name: str, write: bool = False) -> ClickHouseError:
    return access_denied(user, f"{'WRITE' if write else 'READ'} ON {_grant_name(name)}")


def engine_denied(user: str, name: str) -> ClickHouseError:
    return access_denied(user, f"TABLE ENGINE ON {name}")


def multi_statement_error(buf: bytes, at: int) -> ClickHouseError:
    snippet = buf[at : at + 64].decode("utf-8", "replace").replace("\n", " ")
    text = f"Syntax error (Multi-statements are not allowed): failed at position {at + 1} (end of query): {snippet}"
    return ch_error(62, "SYNTAX_ERROR", text)


def setting_error(name: str, readonly: bool) -> ClickHouseError:
    if readonly:
        return ch_error(164, "READONLY", f"Cannot modify '{name}' setting in readonly mode")
    return ch_error(452, "SETTING_CONSTRAINT_VIOLATION", f"Setting {name} should not be changed")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"`":
        return value[1:-1]
    return value


def check_settings_policy(assignments: list[tuple[str, str]], readonly: bool, policy: Policy) -> None:
    """URL parameters, ``SET`` and ``SETTINGS`` clauses alike: access settings are fixed, time is capped."""
    for name, value in assignments:
        low = name.lower()
        if low in FIXED_SETTINGS:
            raise setting_error(name, readonly)
        if low == "max_execution_time":
            try:
                seconds = float(_unquote(value))
            except ValueError:
                continue  # the engine reports a value it cannot parse
            if seconds <= 0 or seconds > policy.max_execution_time:
                limit = f"{policy.max_execution_time:g}"
                raise ch_error(
                    452, "SETTING_CONSTRAINT_VIOLATION", f"Setting max_execution_time shouldn't be greater than {limit}"
                )


def query_too_large(size: int) -> ClickHouseError:
    return ch_error(
        62,
        "SYNTAX_ERROR",
        f"Syntax error: failed at position {MAX_QUERY_SIZE + 1}: Max query size exceeded: the query is {size} "
        f"bytes, this server's max_query_size is {MAX_QUERY_SIZE} (fixed)",
    )


def settings_clauses(buf: bytes, toks: list[Token]) -> list[tuple[str, str]]:
    """Every ``SETTINGS a = 1, b = 'x'`` clause of a statement, at any depth, as (name, value).

    A name without ``= value`` is the engine's shorthand for true (``SETTINGS use_query_cache``): ("name", "1").
    """
    out: list[tuple[str, str]] = []
    for i, tok in enumerate(toks):
        if _word(buf, tok) != "SETTINGS":
            continue
        j, depth = i + 1, tok.depth
        while j < len(toks) and toks[j].depth == depth and toks[j].kind in ("word", "ident"):
            if j + 1 >= len(toks) or not _is(buf, toks[j + 1], b"="):
                out.append((_name(buf, toks[j]), "1"))
                if j + 1 < len(toks) and _is(buf, toks[j + 1], b","):
                    j += 2
                    continue
                break
            name, k = _name(buf, toks[j]), j + 2
            while k < len(toks) and toks[k].depth >= depth and not (toks[k].depth == depth and _is(buf, toks[k], b",")):
                if toks[k].depth == depth and toks[k].kind == "word" and k > j + 2:
                    break  # the next clause (FORMAT, ...) starts
                if toks[k].depth == depth and _is(buf, toks[k], b";"):
                    break
                k += 1
            value = buf[toks[j + 2].start : toks[k - 1].end].decode("utf-8", "replace") if k > j + 2 else ""
            out.append((name, value))
            if k < len(toks) and _is(buf, toks[k], b","):
                j = k + 1
            else:
                break
    return out


def guard(
    buf: bytes, stmt: Statement, readonly: bool, policy: Policy, extra_settings: list[tuple[str, str]] | None = None
) -> None:
    """Refuse, with ClickHouse's own error, a statement this server must not run for a client.

    ``buf`` is the whole request SQL (for an INSERT with inline data, the part the engine parses as SQL:
    everything before the data, and the data too for ``Values``, whose rows are SQL expressions).
    """
    user, kind = policy.user, stmt.kind
    toks = list(tokens(buf))  # the whole statement, or a syntax error (62): nothing is left unread
    # One statement: after the first semicolon (at any depth), nothing but semicolons.
    first = next((i for i, tok in enumerate(toks) if _is(buf, tok, b";")), len(toks))
    if any(not _is(buf, t, b";") for t in toks[first:]):
        raise multi_statement_error(buf, toks[first].start)
    for i, tok in enumerate(toks):
        if tok.depth == 0 and _word(buf, tok) == "PARALLEL" and i + 1 < len(toks) and _word(buf, toks[i + 1]) == "WITH":
            raise multi_statement_error(buf, tok.start)
    words = [_word(buf, t) if t.depth == 0 else "" for t in toks[:6]]
    if kind and kind not in KNOWN_KINDS and kind not in ACCESS_KINDS:
        raise ch_error(
            62, "SYNTAX_ERROR", f"Syntax error: failed at position 1: this server does not run {kind[:64]} statements"
        )
    if kind in ACCESS_KINDS:
        raise access_denied(user, f"{ACCESS_KINDS[kind]} ON *.*")
    if kind in ("CREATE", "ALTER", "DROP", "ATTACH", "DETACH", "SHOW", "REPLACE") or kind == "SET":
        rest = [w for w in words[1:] if w not in ("OR", "REPLACE", "TEMPORARY", "IF", "NOT", "EXISTS")]
        entity = rest[:1] and (rest[0] in ACCESS_ENTITIES - {"SETTINGS"} or rest[:2] == ["SETTINGS", "PROFILE"])
        if entity and kind not in ("SHOW", "SET"):
            raise access_denied(user, "ACCESS MANAGEMENT ON *.*")
        if kind == "SET" and rest[:1] in (["ROLE"], ["DEFAULT"]):
            raise access_denied(user, "ACCESS MANAGEMENT ON *.*")
    for i, tok in enumerate(toks[:-1]):
        # A fixed setting assigned anywhere (SET, SETTINGS, a nested query's SETTINGS, however quoted).
        if tok.kind in ("word", "ident") and _is(buf, toks[i + 1], b"=") and _name(buf, tok).lower() in FIXED_SETTINGS:
            raise setting_error(_name(buf, tok), readonly)
    if readonly and kind not in READONLY_KINDS:
        raise ch_error(
            164,
            "READONLY",
            f"{user}: Cannot execute query in readonly mode. For queries over HTTP, "
            "method GET implies readonly. You should use method POST for modifying queries",
        )
    insert_function = kind == "INSERT" and any(_word(buf, t) == "FUNCTION" for t in toks[:4])
    for i, tok in enumerate(toks):
        word = _word(buf, tok)
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        prev = toks[i - 1] if i > 0 else None
        if word == "INTO" and _word(buf, nxt) == "OUTFILE":
            raise ch_error(358, "INTO_OUTFILE_NOT_ALLOWED", "INTO OUTFILE is not allowed")
        if word == "FROM" and _word(buf, nxt) == "INFILE":
            raise ch_error(78, "UNKNOWN_TYPE_OF_QUERY", "Query has infile and was send directly to server")
        if kind == "ATTACH" and word == "FROM" and nxt is not None and nxt.kind == "string":
            raise ch_error(481, "PATH_ACCESS_DENIED", f"File {_text(buf, nxt)} is not inside the server's user files")
        if word == "ENGINE" and kind in ("CREATE", "ATTACH", "REPLACE", "ALTER"):
            # Only a storage definition names an engine; elsewhere `engine` is a column (system.tables).
            j = i + 2 if _is(buf, nxt, b"=") else i + 1
            engine = _name(buf, toks[j]) if j < len(toks) else ""
            if engine and engine.lower() not in policy.allowed_engines:
                raise engine_denied(user, engine)
        if word == "SOURCE" and _is(buf, nxt, b"(") and i + 2 < len(toks):
            source = _name(buf, toks[i + 2]).upper()
            if source not in ("CLICKHOUSE", "NULL"):
                raise source_denied(user, source.lower())
            end = next((k for k, t in enumerate(toks[i + 3 :]) if t.depth <= tok.depth), len(toks))
            # Keys compared unquoted: the engine takes `QUERY` and "query" for QUERY.
            inner = [t for t in toks[i + 3 : i + 3 + end] if t.depth == tok.depth + 2 and t.kind in ("word", "ident")]
            for key in inner:
                if _name(buf, key).upper() not in _LOCAL_DICTIONARY_KEYS:
                    raise source_denied(user, "remote")
        name = _name(buf, tok)
        if name and _is(buf, nxt, b"(") and name.lower() in policy.denied_functions:
            defines = kind in ("INSERT", "CREATE", "ATTACH", "REPLACE")
            if defines and (_word(buf, prev) in _TABLE_NAME_BEFORE or _is(buf, prev, b".")):
                continue  # ``INSERT INTO remote (a, b)``: a table called like a function
            raise source_denied(user, name, write=insert_function)
    assignments = list(stmt.assignments) + settings_clauses(buf, toks) + list(extra_settings or [])
    check_settings_policy(assignments, readonly, policy)


_CHILDREN_RE = re.compile(r"\(children (\d+)\)$")


def ast_complete(ast: str) -> bool:
    """The parse tree as ``EXPLAIN AST`` printed it is whole: one root, each node indented one step below its
    parent, and as many children under each node as it declares (``(children N)``). Anything else (a
    truncated result, an output format other than the tree) cannot be checked."""
    stack: list[list[int]] = []  # [indent, declared, seen]
    roots = 0
    for raw in ast.split("\n"):  # only a newline ends a node's line (a literal keeps other breaks raw)
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        if not raw[indent].isascii() or not raw[indent].isalpha():  # every node line starts with its type
            return False
        while stack and stack[-1][0] >= indent:
            done = stack.pop()
            if done[1] != done[2]:
                return False
        if stack:
            if indent != stack[-1][0] + 1:
                return False
            stack[-1][2] += 1
        elif indent != 0 or roots:
            return False
        else:
            roots = 1
        declared = _CHILDREN_RE.search(raw.rstrip())
        stack.append([indent, int(declared.group(1)) if declared else 0, 0])
    return roots == 1 and all(node[1] == node[2] for node in stack)


def unreadable_tree() -> ClickHouseError:
    return ch_error(62, "SYNTAX_ERROR", "Syntax error: this server could not read the statement's parse tree in full")


def ast_violation(ast: str, policy: Policy) -> ClickHouseError | None:
    """The second layer: the engine's own parse tree, which spelling cannot disguise.

    ``EXPLAIN AST`` prints one node a line, indented by depth: a table function is a ``Function`` under a
    ``TableExpression`` (or straight under ``InsertQuery`` for ``INSERT INTO FUNCTION``), an engine a
    ``Function`` under ``Storage definition``, a dictionary source ``FunctionWithKeyValueArguments``, and
    ``INTO OUTFILE`` / ``FROM INFILE`` a bare ``Literal`` child of the query node.
    """
    if not ast_complete(ast):
        return unreadable_tree()
    user = policy.user
    parents: list[list[Any]] = []  # [indent, line, children seen so far]
    for raw in ast.split("\n"):  # only a newline ends a node's line (a literal keeps other breaks raw)
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        line = raw.strip()
        while parents and parents[-1][0] >= indent:
            parents.pop()
        parent = parents[-1][1] if parents else ""
        first_child = not parents or parents[-1][2] == 0
        if parents:
            parents[-1][2] += 1
        node, _, rest = line.partition(" ")
        name = rest.split(" ")[0].strip() if rest else ""
        if indent == 0 and line.startswith(("SYSTEM", "KillQuery", "Backup", "Grant", "SetRole", "MoveAccess")):
            return access_denied(user, "SYSTEM ON *.*" if line.startswith("SYSTEM") else "ACCESS MANAGEMENT ON *.*")
        if node == "FunctionWithKeyValueArguments":
            name = rest.strip().split(" ")[0]
            if parent.startswith("Dictionary definition") and name.lower() not in ("clickhouse", "null"):
                return source_denied(user, name)
        elif node == "Function" and name:
            low = name.lower()
            if parent.startswith("Storage definition") and first_child:  # then ORDER BY, PARTITION BY...
                if low not in policy.allowed_engines:
                    return engine_denied(user, name)
            elif parent.startswith("InsertQuery"):
                if low not in policy.allowed_table_functions:
                    return source_denied(user, name, write=True)
            elif parent.startswith("TableExpression"):
                if low not in policy.allowed_table_functions:
                    return source_denied(user, name)
            elif low in policy.denied_functions:
                return source_denied(user, name)
        elif node == "Literal" and parents and indent == parents[0][0] + 1 and len(parents) == 1:
            root = parents[0][1]
            if root.startswith("InsertQuery"):
                return ch_error(78, "UNKNOWN_TYPE_OF_QUERY", "Query has infile and was send directly to server")
            if root.startswith("SelectWithUnionQuery"):
                return ch_error(358, "INTO_OUTFILE_NOT_ALLOWED", "INTO OUTFILE is not allowed")
        parents.append([indent, line, 0])
    return None
