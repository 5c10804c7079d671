"""The local ClickHouse server's statement guard, as pure functions (no engine, no server).

Each refusal must carry the error a real ClickHouse server gives a user without the grant, so
clickhouse-connect and curl users see the code and name they would see there.
"""

from __future__ import annotations

import pytest

from changeflow.deploy.clickhouse_server.errors import ClickHouseError
from changeflow.deploy.clickhouse_server.guard import (
    Policy,
    ast_violation,
    check_settings_policy,
    guard,
    settings_clauses,
)
from changeflow.deploy.clickhouse_server.handler import valid_query_id
from changeflow.deploy.clickhouse_server.lexer import analyze, tokens

POLICY = Policy(user="default", max_execution_time=300)


def refused(sql: str, readonly: bool = False) -> ClickHouseError:
    buf = sql.encode()
    with pytest.raises(ClickHouseError) as info:
        guard(buf, analyze(buf), readonly, POLICY)
    return info.value


def allowed(sql: str, readonly: bool = False) -> None:
    buf = sql.encode()
    guard(buf, analyze(buf), readonly, POLICY)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1; DROP TABLE t",
        "SELECT 1;DROP TABLE t;",
        "SELECT ';' AS a; SELECT 2",
        "SELECT 1 /* ; */ ; SELECT 2",
        "SELECT 1 PARALLEL WITH DROP TABLE t",
    ],
)
def test_multi_statements_are_refused(sql: str) -> None:
    err = refused(sql)
    assert (err.code, err.name) == (62, "SYNTAX_ERROR")
    assert "Multi-statements are not allowed" in err.message


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1;",
        "SELECT 1 ;  ; ",
        "SELECT 'a; DROP TABLE t' AS s",
        "SELECT 1 -- ; DROP TABLE t",
        "SELECT `x;y` FROM t",
        "SELECT 'it\\'s; here'",
    ],
)
def test_semicolons_inside_strings_comments_and_at_the_end_are_fine(sql: str) -> None:
    allowed(sql)


@pytest.mark.parametrize(
    ("sql", "grant"),
    [
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "READ ON FILE"),
        ("SELECT file('/etc/passwd')", "READ ON FILE"),
        ("SELECT * FROM `file`('/etc/passwd')", "READ ON FILE"),
        ("SELECT * FROM FILE /* hidden */ ('/etc/passwd')", "READ ON FILE"),
        ("SELECT * FROM url('http://169.254.169.254/', CSV, 'a String')", "READ ON URL"),
        ("SELECT * FROM remote('10.0.0.1', system.one)", "READ ON REMOTE"),
        ("SELECT * FROM remoteSecure('10.0.0.1', system.one)", "READ ON REMOTE"),
        ("SELECT * FROM s3('http://x/y.csv')", "READ ON S3"),
        ("SELECT * FROM s3Cluster('c', 'http://x/y.csv')", "READ ON S3"),
        ("SELECT * FROM hdfs('hdfs://x/y')", "READ ON HDFS"),
        ("SELECT * FROM postgresql('h:5432', 'db', 't', 'u', 'p')", "READ ON POSTGRES"),
        ("SELECT * FROM mysql('h:3306', 'db', 't', 'u', 'p')", "READ ON MYSQL"),
        ("SELECT * FROM sqlite('/tmp/x.db', 't')", "READ ON SQLITE"),
        ("SELECT * FROM jdbc('x', 't')", "READ ON JDBC"),
        ("SELECT * FROM odbc('x', 't')", "READ ON ODBC"),
        ("SELECT * FROM mongodb('h', 'db', 'c', 'u', 'p', 'a String')", "READ ON MONGO"),
        ("SELECT * FROM executable('x.sh', TSV, 'a String')", "READ ON EXECUTABLE"),
        ("SELECT * FROM input('a String')", "READ ON INPUT"),
        ("SELECT * FROM numbers(1) WHERE number IN (SELECT * FROM url('http://x', CSV))", "READ ON URL"),
        ("INSERT INTO FUNCTION file('/tmp/out.csv', CSV) SELECT 1", "WRITE ON FILE"),
        ("INSERT INTO TABLE FUNCTION url('http://x', CSV) SELECT 1", "WRITE ON URL"),
        ("CREATE TABLE t (a UInt8) ENGINE = File(CSV)", "TABLE ENGINE ON File"),
        ("CREATE TABLE t (a UInt8) ENGINE = URL('http://x', CSV)", "TABLE ENGINE ON URL"),
        ("CREATE TABLE t (a UInt8) ENGINE = Kafka SETTINGS kafka_broker_list = 'h'", "TABLE ENGINE ON Kafka"),
        ("CREATE TABLE t (a UInt8) ENGINE Distributed(c, db, t)", "TABLE ENGINE ON Distributed"),
        ("CREATE DATABASE d ENGINE = MySQL('h:3306', 'db', 'u', 'p')", "TABLE ENGINE ON MySQL"),
        ("CREATE TABLE t AS remote('h', db.t)", "READ ON REMOTE"),
        ("CREATE TABLE t (a UInt8) ENGINE = MergeTree ORDER BY a SETTINGS disk = disk(type = local, path = '/')",
         "READ ON FILE"),
        ("CREATE DICTIONARY d (k UInt64) PRIMARY KEY k SOURCE(FILE(path '/etc/passwd' format 'TSV')) "
         "LAYOUT(FLAT()) LIFETIME(0)", "READ ON FILE"),
        ("CREATE DICTIONARY d (k UInt64) PRIMARY KEY k SOURCE(HTTP(url 'http://x' format 'TSV')) "
         "LAYOUT(FLAT()) LIFETIME(0)", "READ ON URL"),
        ("CREATE DICTIONARY d (k UInt64) PRIMARY KEY k SOURCE(EXECUTABLE(command 'id' format 'TSV')) "
         "LAYOUT(FLAT()) LIFETIME(0)", "READ ON EXECUTABLE"),
        ("CREATE DICTIONARY d (k UInt64) PRIMARY KEY k SOURCE(CLICKHOUSE(HOST '10.0.0.1' TABLE 't')) "
         "LAYOUT(FLAT()) LIFETIME(0)", "READ ON REMOTE"),
        ("CREATE DICTIONARY d (k UInt64) PRIMARY KEY k SOURCE(CLICKHOUSE(QUERY 'SELECT * FROM file(1)')) "
         "LAYOUT(FLAT()) LIFETIME(0)", "READ ON REMOTE"),
        ("SYSTEM DROP DNS CACHE", "SYSTEM ON *.*"),
        ("system shutdown", "SYSTEM ON *.*"),
        ("KILL QUERY WHERE 1", "KILL QUERY ON *.*"),
        ("BACKUP TABLE t TO Disk('default', 'x.zip')", "BACKUP ON *.*"),
        ("RESTORE TABLE t FROM Disk('default', 'x.zip')", "BACKUP ON *.*"),
        ("CREATE USER u IDENTIFIED BY 'p'", "ACCESS MANAGEMENT ON *.*"),
        ("CREATE OR REPLACE ROLE r", "ACCESS MANAGEMENT ON *.*"),
        ("CREATE SETTINGS PROFILE p SETTINGS readonly = 0", "ACCESS MANAGEMENT ON *.*"),
        ("CREATE NAMED COLLECTION c AS url = 'http://x'", "ACCESS MANAGEMENT ON *.*"),
        ("GRANT ALL ON *.* TO u", "ACCESS MANAGEMENT ON *.*"),
        ("SET ROLE r", "ACCESS MANAGEMENT ON *.*"),
        ("SET DEFAULT ROLE r TO u", "ACCESS MANAGEMENT ON *.*"),
    ],
)  # fmt: skip
def test_what_reaches_outside_the_engine_is_access_denied(sql: str, grant: str) -> None:
    err = refused(sql)
    assert (err.code, err.name) == (497, "ACCESS_DENIED")
    assert err.message.endswith(f"it's necessary to have the grant {grant}. (ACCESS_DENIED)"), err.message
    assert err.http_status == 403


def test_outfile_infile_and_attach_from_a_path() -> None:
    err = refused("SELECT 1 INTO OUTFILE '/tmp/x'")
    assert (err.code, err.name) == (358, "INTO_OUTFILE_NOT_ALLOWED")
    assert err.message == "Code: 358. DB::Exception: INTO OUTFILE is not allowed. (INTO_OUTFILE_NOT_ALLOWED)"
    err = refused("INSERT INTO t FROM INFILE '/etc/passwd' FORMAT TSV")
    assert (err.code, err.name) == (78, "UNKNOWN_TYPE_OF_QUERY")
    assert "Query has infile and was send directly to server" in err.message
    err = refused("ATTACH TABLE t FROM '/var/lib/x' (a UInt8) ENGINE = MergeTree ORDER BY a")
    assert (err.code, err.name) == (481, "PATH_ACCESS_DENIED")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM numbers(10)",
        "SELECT * FROM system.tables",
        "SELECT 'file(' AS a, \"url\" FROM t",
        "SELECT url, file, remote FROM logs WHERE url LIKE '%s3(%'",
        "INSERT INTO remote (a, b) VALUES (1, 2)",
        "CREATE TABLE IF NOT EXISTS url (a UInt8) ENGINE = MergeTree ORDER BY a",
        "CREATE TABLE changeflow.orders (key String, _version UInt64, _is_deleted UInt8) "
        "ENGINE = ReplacingMergeTree(_version, _is_deleted) ORDER BY key",
        "CREATE TABLE t (a UInt8) ENGINE = Memory",
        "CREATE DATABASE IF NOT EXISTS `changeflow`",
        "CREATE DATABASE d ENGINE = Atomic",
        "CREATE DICTIONARY d (k UInt64) PRIMARY KEY k SOURCE(CLICKHOUSE(TABLE 't' DB 'changeflow')) "
        "LAYOUT(FLAT()) LIFETIME(0)",
        "INSERT INTO t (k, v) FORMAT Native",
        "ALTER TABLE t DELETE WHERE k = 'x'",
        "OPTIMIZE TABLE t FINAL",
        "SELECT * FROM t FINAL SETTINGS max_threads = 2, max_execution_time = 10",
        "SELECT * FROM format(JSONEachRow, '{\"a\": 1}')",
        "SHOW TABLES",
    ],
)
def test_ordinary_statements_pass(sql: str) -> None:
    allowed(sql)


@pytest.mark.parametrize("sql", ["CREATE TABLE t (a UInt8) ENGINE = Memory", "INSERT INTO t VALUES (1)",
                                 "DROP TABLE t", "ALTER TABLE t DELETE WHERE 1", "OPTIMIZE TABLE t"])  # fmt: skip
def test_get_is_readonly_for_every_statement(sql: str) -> None:
    err = refused(sql, readonly=True)
    assert (err.code, err.name) == (164, "READONLY")
    assert "method GET implies readonly" in err.message


def test_get_may_read_set_and_use() -> None:
    for sql in ("SELECT 1", "WITH 1 AS a SELECT a", "SHOW TABLES", "DESCRIBE TABLE t", "SET max_threads = 1",
                "USE changeflow", "EXISTS TABLE t", "EXPLAIN SELECT 1"):  # fmt: skip
        allowed(sql, readonly=True)


@pytest.mark.parametrize("name", ["readonly", "allow_ddl", "allow_introspection_functions", "dialect", "format_schema",
                                  "input_format_record_errors_file_path", "output_format_schema"])  # fmt: skip
def test_access_settings_are_fixed(name: str) -> None:
    for sql in (f"SET {name} = 0", f"SELECT 1 SETTINGS {name} = 0", f"SELECT 1 SETTINGS max_threads = 1, {name} = 0",
                f"SELECT * FROM (SELECT 1 SETTINGS {name} = 0)"):  # fmt: skip
        err = refused(sql)
        assert (err.code, err.name) == (452, "SETTING_CONSTRAINT_VIOLATION"), sql
        assert (
            err.message
            == f"Code: 452. DB::Exception: Setting {name} should not be changed. (SETTING_CONSTRAINT_VIOLATION)"
        )
        err = refused(sql, readonly=True)
        assert (err.code, err.name) == (164, "READONLY"), sql
        assert f"Cannot modify '{name}' setting in readonly mode" in err.message
    with pytest.raises(ClickHouseError) as info:
        check_settings_policy([(name, "'1'")], False, POLICY)  # a URL parameter
    assert info.value.code == 452


def test_max_execution_time_may_only_go_down() -> None:
    check_settings_policy([("max_execution_time", "'10'")], False, POLICY)
    for value in ("301", "'1000'", "0"):
        with pytest.raises(ClickHouseError) as info:
            check_settings_policy([("max_execution_time", value)], False, POLICY)
        assert (info.value.code, info.value.name) == (452, "SETTING_CONSTRAINT_VIOLATION")
        assert "Setting max_execution_time shouldn't be greater than 300" in info.value.message
    err = refused("SELECT sleep(1) SETTINGS max_execution_time = 100000")
    assert err.code == 452


def test_settings_clauses_are_found_at_any_depth() -> None:
    sql = b"SELECT * FROM (SELECT 1 SETTINGS a = 1, b = 'x,y') SETTINGS c = [1, 2] FORMAT JSON"
    assert settings_clauses(sql, list(tokens(sql))) == [("a", "1"), ("b", "'x,y'"), ("c", "[1, 2]")]


def test_values_rows_are_sql_and_are_checked() -> None:
    err = refused("INSERT INTO t VALUES (file('/etc/passwd'))")
    assert err.code == 497


def test_query_id_must_be_safe_to_echo() -> None:
    assert valid_query_id("q-1_ok") == "q-1_ok"
    for bad in ("a\r\nSet-Cookie: x=1", "a b", "x" * 129, "é"):
        with pytest.raises(ClickHouseError) as info:
            valid_query_id(bad)
        assert (info.value.code, info.value.name) == (36, "BAD_ARGUMENTS")


TABLE_FN_AST = """SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Asterisk
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      Function {name} (children 1)
       ExpressionList (children 1)
        Literal \\'x\\'
"""


def test_ast_layer_allows_only_known_table_functions() -> None:
    assert ast_violation(TABLE_FN_AST.format(name="numbers"), POLICY) is None
    err = ast_violation(TABLE_FN_AST.format(name="somethingNew"), POLICY)
    assert err is not None and err.code == 497 and "READ ON SOMETHINGNEW" in err.message
    err = ast_violation(TABLE_FN_AST.format(name="file"), POLICY)
    assert err is not None and err.code == 497


def test_ast_layer_engines_outfile_infile_system() -> None:
    create = "CreateQuery t (children 2)\n Identifier t\n Storage definition (children 1)\n  Function {name}\n"
    assert ast_violation(create.format(name="ReplacingMergeTree"), POLICY) is None
    err = ast_violation(create.format(name="S3Queue"), POLICY)
    assert err is not None and "TABLE ENGINE ON S3Queue" in err.message
    outfile = "SelectWithUnionQuery (children 2)\n ExpressionList (children 1)\n  SelectQuery\n Literal \\'/tmp/x\\'\n"
    assert (err := ast_violation(outfile, POLICY)) is not None and err.code == 358
    fmt = "SelectWithUnionQuery (children 2)\n ExpressionList (children 1)\n  SelectQuery\n Identifier JSON\n"
    assert ast_violation(fmt, POLICY) is None
    infile = "InsertQuery   (children 2)\n Literal \\'/etc/passwd\\'\n Identifier t\n"
    assert (err := ast_violation(infile, POLICY)) is not None and err.code == 78
    assert (err := ast_violation("SYSTEM query\n", POLICY)) is not None and err.code == 497
    dictionary = (
        "CreateQuery d (children 1)\n Dictionary definition (children 1)\n  FunctionWithKeyValueArguments  mysql\n"
    )
    assert (err := ast_violation(dictionary, POLICY)) is not None and "READ ON MYSQL" in err.message


def test_ast_layer_reads_only_the_engine_of_a_storage_definition() -> None:
    create = (
        "CreateQuery t (children 2)\n Identifier t\n Storage definition (children 2)\n  Function MergeTree\n"
        "  Function tuple (children 1)\n   ExpressionList (children 2)\n    Identifier w\n    Identifier i\n"
    )
    assert ast_violation(create, POLICY) is None


def test_describe_of_a_table_function_is_not_taken_for_a_table_name() -> None:
    assert refused("DESCRIBE TABLE file('/etc/passwd', 'LineAsString')").code == 497
    assert refused("DESC TABLE url('http://x', CSV)").code == 497


def test_a_column_named_engine_in_a_select_is_no_storage_definition() -> None:
    """`engine` of system.tables is a column: reading it is allowed (a real server allows it)."""
    buf = (
        b"SELECT database, name, engine FROM system.tables WHERE database IN ['x'] ORDER BY engine = 'View' DESC, name"
    )
    guard(buf, analyze(buf), False, POLICY)  # no ClickHouseError
    assert refused("CREATE TABLE t (x Int8) ENGINE = File(TSV)").code == 497


# -- fail closed (#20 §1) ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "what"),
    [
        ("SELECT 'open", "Unmatched quotes"),
        ("SELECT `open", "Unmatched backquote"),
        ("SELECT /* /* */ 1", "Multiline comment is not closed"),
        ("SELECT $a b$ 1 $a b$", "a heredoc tag other than $[A-Za-z0-9_]*$"),
        ("SELECT #x", "'#' starts a comment only when followed by a space or '!'"),
        ("SELECT\u16801", "unexpected byte 0xe1"),  # Ogham space: the engine does not skip it either
        ("SELECT 1\x00", "unexpected byte 0x00"),
        ("SELECT \\ 1", "unexpected byte 0x5c"),
    ],
)
def test_what_the_scanner_cannot_read_as_the_engine_does_is_a_syntax_error(sql: str, what: str) -> None:
    with pytest.raises(ClickHouseError) as info:
        list(tokens(sql.encode()))
    assert (info.value.code, info.value.name) == (62, "SYNTAX_ERROR")
    assert what in info.value.message


def test_dollars_and_unicode_spaces_are_read_as_the_engine_reads_them() -> None:
    """Measured on this chdb: ``{$x:Int32}`` is a parameter named ``$x`` (a bare word), a lone ``$`` a token of its
    own, and U+00A0, U+2000..U+200B, U+3000, U+FEFF... are spaces, as in ``SELECT 13;\u00a0``."""
    buf = "SELECT {$x:Int32}, {$x$:String}, $ FROM t\u00a0WHERE\u200ba\u3000=\ufeff1;\u00a0".encode()
    assert [buf[t.start : t.end] for t in tokens(buf)] == [
        b"SELECT", b"{", b"$x", b":", b"Int32", b"}", b",", b"{", b"$x$", b":", b"String", b"}", b",", b"$",
        b"FROM", b"t", b"WHERE", b"a", b"=", b"1", b";",
    ]  # fmt: skip
    assert refused("SELECT 1 INTO\u00a0OUTFILE '/tmp/x'").code == 358
    assert refused("SELECT * FROM\u2003file('/etc/passwd')").code == 497


def test_heredocs_and_nested_comments_are_read_as_the_engine_reads_them() -> None:
    buf = b"SELECT $$'$$ AS x, $t$ ; $t$ /* /* ; */ ; */ FROM file('/etc/hostname') -- '"
    assert [buf[t.start : t.end] for t in tokens(buf)] == [
        b"SELECT", b"$$'$$", b"AS", b"x", b",", b"$t$ ; $t$", b"FROM", b"file", b"(", b"'/etc/hostname'", b")",
    ]  # fmt: skip
    assert refused(buf.decode()).code == 497
    assert refused("SELECT $$'$$; DROP TABLE t --'").code == 62
    assert refused("SELECT (1; DROP TABLE t)").code == 62  # a semicolon at any depth
    buf = b"SELECT 1 // ; DROP TABLE t '\n, 2"  # a C++-style comment, as the engine has it
    assert [buf[t.start : t.end] for t in tokens(buf)] == [b"SELECT", b"1", b",", b"2"]


@pytest.mark.parametrize("key", ["`QUERY`", '"query"', "`Query`", "QUERY", "`HOST`", "NAME"])
def test_dictionary_source_keys_are_compared_unquoted(key: str) -> None:
    sql = (f"CREATE DICTIONARY d (k UInt64) PRIMARY KEY k SOURCE(CLICKHOUSE({key} 'x' TABLE 't')) "
           "LAYOUT(FLAT()) LIFETIME(0)")  # fmt: skip
    err = refused(sql)
    assert (err.code, err.name) == (497, "ACCESS_DENIED")


@pytest.mark.parametrize("name", ["max_query_size", "max_parser_depth", "max_parser_backtracks", "max_ast_depth",
                                  "max_ast_elements", "max_expanded_ast_elements", "readonly",
                                  "allow_ddl"])  # fmt: skip
def test_parser_limits_are_fixed_wherever_they_are_set(name: str) -> None:
    for sql in (f"SET {name} = 1", f"SELECT 1 SETTINGS {name} = 1", f"SELECT 1 SETTINGS `{name}` = 1",
                f'SELECT * FROM (SELECT 1 SETTINGS "{name}"=1)', f"SELECT 1 SETTINGS max_threads = 1, {name}",
                f"SELECT 1 SETTINGS {name}"):  # fmt: skip
        err = refused(sql)
        assert (err.code, err.name) == (452, "SETTING_CONSTRAINT_VIOLATION"), sql
    with pytest.raises(ClickHouseError) as info:
        check_settings_policy([(name, "'1000000000'")], False, POLICY)  # a URL parameter
    assert info.value.code == 452


def test_unknown_statement_kinds_are_refused() -> None:
    for sql in ("FOO BAR", "PREPARE x", "BEGIN TRANSACTION", "WATCH lv"):
        err = refused(sql)
        assert (err.code, err.name) == (62, "SYNTAX_ERROR"), sql


def test_a_literal_with_raw_line_breaks_other_than_newline_is_one_node() -> None:
    tree = "SelectWithUnionQuery (children 1)\n ExpressionList (children 1)\n  Literal 'a\x1cb\x85c\u2028d'\n"
    assert ast_violation(tree, POLICY) is None


def test_an_incomplete_parse_tree_is_refused() -> None:
    err = ast_violation("SelectWithUnionQuery (children 2)\n ExpressionList (children 1)\n", POLICY)
    assert err is not None and (err.code, err.name) == (62, "SYNTAX_ERROR")
    assert ast_violation("\x00\x01binary", POLICY) is not None
