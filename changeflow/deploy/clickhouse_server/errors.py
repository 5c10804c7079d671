"""ClickHouse's errors as a client sees them: ``Code: N. DB::Exception: ... (NAME)``, the HTTP status by name."""

from __future__ import annotations

import re

# exceptionCodeToHTTPStatus in ClickHouse's src/Server/HTTP, by error name.
_STATUS_BY_ERROR = {
    401: {"REQUIRED_PASSWORD"},
    403: {"UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE", "ACCESS_DENIED"},
    400: {
        "BAD_ARGUMENTS",
        "CANNOT_COMPILE_REGEXP",
        "CANNOT_PARSE_TEXT",
        "CANNOT_PARSE_ESCAPE_SEQUENCE",
        "CANNOT_PARSE_QUOTED_STRING",
        "CANNOT_PARSE_DATE",
        "CANNOT_PARSE_DATETIME",
        "CANNOT_PARSE_NUMBER",
        "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING",
        "CANNOT_PARSE_IPV4",
        "CANNOT_PARSE_IPV6",
        "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
        "CANNOT_PARSE_UUID",
        "DUPLICATE_COLUMN",
        "ILLEGAL_COLUMN",
        "UNKNOWN_ELEMENT_IN_AST",
        "UNKNOWN_TYPE_OF_AST_NODE",
        "THERE_IS_NO_COLUMN",
        "TOO_DEEP_AST",
        "TOO_BIG_AST",
        "UNEXPECTED_AST_STRUCTURE",
        "SYNTAX_ERROR",
        "INCORRECT_DATA",
        "TYPE_MISMATCH",
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    },
    404: {
        "UNKNOWN_TABLE",
        "UNKNOWN_FUNCTION",
        "UNKNOWN_IDENTIFIER",
        "UNKNOWN_TYPE",
        "UNKNOWN_STORAGE",
        "UNKNOWN_DATABASE",
        "UNKNOWN_SETTING",
        "UNKNOWN_DIRECTION_OF_SORTING",
        "UNKNOWN_AGGREGATE_FUNCTION",
        "UNKNOWN_FORMAT",
        "UNKNOWN_DATABASE_ENGINE",
        "UNKNOWN_TYPE_OF_QUERY",
        "UNKNOWN_ROLE",
    },
    413: {"QUERY_IS_TOO_LARGE"},
    501: {"NOT_IMPLEMENTED"},
    503: {"SOCKET_TIMEOUT", "CANNOT_OPEN_FILE", "CANNOT_SCHEDULE_TASK", "TOO_MANY_SIMULTANEOUS_QUERIES"},
    411: {"HTTP_LENGTH_REQUIRED"},
    408: {"TIMEOUT_EXCEEDED"},
    415: {"UNSUPPORTED_MEDIA_TYPE"},
}
HTTP_STATUS = {name: status for status, names in _STATUS_BY_ERROR.items() for name in names}

_CODE_RE = re.compile(r"Code: (\d+)\.")
_REPEATED_PREFIX = re.compile(r"^(Code: (\d+)\. DB::Exception: )(?:Code: \2\. DB::Exception: )+")
_NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]+)\)(?:\s*\(version [^)]*\))?\s*$")


class ClickHouseError(Exception):
    """An error reported to the client the way ClickHouse reports it (code, name, message)."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.name = name
        self.message = message

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """chdb's exceptions carry the server's own text; keep it from ``Code:`` on."""
        text = str(exc)
        at = text.find("Code: ")
        text = text[at:] if at >= 0 else text
        text = _REPEATED_PREFIX.sub(r"\1", text, count=1)  # "Code: 27. DB::Exception: Code: 27. DB::Exception: "
        code_match = _CODE_RE.match(text)
        name_match = _NAME_RE.search(text)
        code = int(code_match.group(1)) if code_match else 1001
        name = name_match.group(1) if name_match else "STD_EXCEPTION"
        if code_match:
            return cls(code, name, text.strip())
        return cls(code, name, f"Code: {code}. DB::Exception: {text.strip()}. ({name})")

    def body(self, version: str) -> bytes:
        text = self.message if "(version " in self.message else f"{self.message} (version {version})"
        return (text.rstrip() + "\n").encode()

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.name, 500)


def ch_error(code: int, name: str, message: str) -> ClickHouseError:
    return ClickHouseError(code, name, f"Code: {code}. DB::Exception: {message}. ({name})")
