"""The one YAML dialect every splitserve file is read in: YAML 1.2 (ruamel.yaml, round
trip). The routing document, the `server:`/`limits:`/`repository:` settings in the same
file and every model.yaml go through here, so `access_log: off` is the string "off"
(YAML 1.1 would have read a boolean) and a file means the same to every reader.

`load` gives plain Python values (dict, list, str, int, float, bool, None) for
validation; `load_rt` and `dump_rt` keep comments, order and quoting for the writers
that change one entry of a user's file.
"""

from __future__ import annotations

import io
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError as _RuamelError

__all__ = ["YamlError", "load", "load_rt", "dump_rt"]


class YamlError(ValueError):
    """Not valid YAML. `reason` is one line (what is wrong, and where when known);
    `line` and `column` count from 1 (None when unknown)."""

    def __init__(self, reason: str, problem: str, line: int | None, column: int | None):
        super().__init__(reason)
        self.reason, self.problem, self.line, self.column = reason, problem, line, column


def _rt() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _error(e: Exception) -> YamlError:
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    column = mark.column + 1 if mark is not None else None
    if not problem:
        text = " ".join(str(e).split())
        return YamlError(text, text, line, column)
    context = getattr(e, "context", None)
    where = f" (line {line}, column {column})" if line is not None else ""
    return YamlError(f"{context + ': ' if context else ''}{problem}{where}", problem, line, column)


def load_rt(text: str) -> Any:
    """The document as ruamel's round-trip objects (comments kept); YamlError if invalid."""
    try:
        return _rt().load(text)
    except _RuamelError as e:
        raise _error(e) from None


def plain(x: Any) -> Any:
    """Round-trip objects as plain Python values (str subclasses as str, and so on)."""
    if isinstance(x, dict):
        return {plain(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, str):
        return str(x)
    if isinstance(x, int):
        return bool(x) if type(x).__name__ == "ScalarBoolean" else int(x)
    if isinstance(x, float):
        return float(x)
    return x


def load(text: str) -> Any:
    """The document as plain Python values; YamlError (one line) if it is not valid YAML."""
    return plain(load_rt(text))


def dump_rt(doc: Any) -> str:
    buf = io.StringIO()
    _rt().dump(doc, buf)
    return buf.getvalue()
