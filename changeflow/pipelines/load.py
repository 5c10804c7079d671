"""Reading a pipeline file: YAML into the typed model, with errors that name the file, the path inside it,
what is wrong and what would be right."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from changeflow.pipelines.model import SECRET_REF, PipelineFile, StoreConfigError
from changeflow.pipelines.spec import Pipeline, build

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COMMERCE = PROJECT_ROOT / "examples" / "commerce" / "pipeline.yml"


class PipelineError(ValueError):
    """An invalid pipeline file; the message is meant for the user as it stands."""

    def __init__(self, path: Path | str, location: str, message: str) -> None:
        self.path, self.location = str(path), location
        super().__init__(f"{path}: {location + ': ' if location else ''}{message}")


def _location(err: Any) -> str:
    # pydantic puts the name of a union/function validator into `loc`; the user's path has only keys. A store's
    # own model (validated by the registry, below `stores`) says where inside it.
    parts = [str(part) for part in err["loc"] if not str(part).startswith("function-")]
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, StoreConfigError):
        parts.append(inner.location)
    return ".".join(parts)


def _message(err: Any) -> str:
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, StoreConfigError):
        return inner.message
    if kind == "extra_forbidden":
        return "unknown field; check the spelling against `changeflow pipeline schema`"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_pattern_mismatch":
        return f"{err.get('input')!r} is not a lower-case identifier (a letter, then letters, digits or _)"
    return str(msg)


# A pipeline file is a page of configuration: a larger one is refused before YAML reads it.
MAX_FILE_BYTES = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    """YAML as a pipeline file needs it, and nothing that can say one thing and mean another: a key given twice
    in one mapping is an error naming both lines (PyYAML keeps the last in silence: a second ``fields:``
    block dropped ``drop: [ssn]``), and aliases are refused (a 482-byte file of aliases expanded to a 42 MB
    search mapping; a recursive anchor crashed sink setup)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not allowed in a pipeline file; write the value out",
                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]}); a second one would replace "
                                "the first in silence: merge them into one", key_node.start_mark)
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep)


# YAML 1.2's booleans only: under YAML 1.1 a view's `on: user_id` would be the key True, and `no` a boolean.
_StrictLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def parse(text: str, path: Path | str = "<pipeline>") -> Pipeline:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_BYTES:
        raise PipelineError(path, "", f"{size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit of a pipeline "
                                      "file; split it into one file per pipeline")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PipelineError(path, where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise PipelineError(path, "", "expected a mapping with `name`, `sources` and `entities`")
    try:
        model = PipelineFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PipelineError(path, _location(first), _message(first)) from None
    return build(model, Path(path) if not isinstance(path, Path) else path)


def load(path: Path | None = None) -> Pipeline:
    """The pipeline from ``path``; without one, the commerce example (the demo)."""
    target = path or COMMERCE
    try:
        text = target.read_text()
    except OSError as exc:
        raise PipelineError(target, "", f"cannot be read: {exc.strerror or exc}") from None
    return parse(text, target)


def resolve_secret(reference: str, what: str = "secret") -> str:
    """``${env:VAR}`` or ``${file:/path}`` → its value, for the process that needs it (never logged)."""
    match = SECRET_REF.match(reference)
    if match is None:
        raise PipelineError("<pipeline>", what, "not a ${env:VAR} or ${file:/path} reference")
    kind, name = match.groups()
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise PipelineError("<pipeline>", what, f"environment variable {name} is not set")
        return value
    try:
        return Path(name).read_text().strip()
    except OSError as exc:
        raise PipelineError("<pipeline>", what, f"cannot read {name}: {exc.strerror or exc}") from None
