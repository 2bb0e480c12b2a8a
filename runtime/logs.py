"""Structured logging: one line per event, key=value (default) or JSON.

Messages are written as `log.info("event=name key=%s other=%d", a, b)`. Each `key=%X`
placeholder is a field whose value is the argument itself (`fields`): the JSON formatter
writes it as it is (a path with a space, `a b=c`, a newline: one field, unchanged), the
kv formatter quotes it when it is not a plain token. Values written into the format
string itself (`event=name`, `hint='...'`) and messages with other placeholders are read
back by one parser (`parse`), as before. Successful requests are logged only by the
access log (runtime/server/rest/access_log.py).
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
import time

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("kv", "json")

_PLAIN = re.compile(r"[A-Za-z0-9_.,:/@+\-*%#~^]+\Z")  # written as is; anything else is repr-quoted
_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_.\-]*)=")
_INT = re.compile(r"[+-]?\d+\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?\Z")
_CONSTS = {"True": True, "False": False, "None": None}
_CLOSE = {"{": "}", "[": "]", "(": ")"}
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # would break the one-line rule


def value(v: object) -> str:
    """One value as the kv format writes it: plain tokens as they are, the rest repr-quoted."""
    if v is None or isinstance(v, (bool, int, float)):
        return str(v)
    s = v if isinstance(v, str) else str(v)
    return s if _PLAIN.match(s) else repr(s)


def kv(**fields: object) -> str:
    """`k1=v1 k2='v 2'`: a message in the format the parser reads back."""
    return " ".join(f"{k}={value(v)}" for k, v in fields.items())


def _scan_quoted(s: str, i: int) -> int:
    """Index just past the string literal starting at s[i] (a quote), or len(s)."""
    q, i = s[i], i + 1
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == q:
            return i + 1
        i += 1
    return len(s)


def _scan_bracketed(s: str, i: int) -> int:
    """Index just past the bracketed literal starting at s[i], quotes respected, or len(s)."""
    stack = []
    while i < len(s):
        c = s[i]
        if c in "'\"":
            i = _scan_quoted(s, i)
            continue
        if c in _CLOSE:
            stack.append(_CLOSE[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    return len(s)


def _bare(token: str) -> object:
    if _INT.match(token):
        return int(token)
    if _FLOAT.match(token):
        return float(token)
    return _CONSTS[token] if token in _CONSTS else token


def _literal(token: str) -> object:
    try:
        return ast.literal_eval(token)  # literals only: never evaluates code
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return token


def parse(msg: str) -> tuple[list[tuple[str, object, str]], str]:
    """Split a message into (key, value, raw token) pairs and the words that are not pairs.

    Bare values end at whitespace and become int, float, bool or None when they read as
    one; quoted values are string literals; `{...}`, `[...]`, `(...)` values are Python
    literals (the repr of a dict, say). Malformed quoting never raises: the rest of the
    message becomes the value.
    """
    pairs: list[tuple[str, object, str]] = []
    words: list[str] = []
    i, n = 0, len(msg)
    while i < n:
        if msg[i].isspace():
            i += 1
            continue
        m = _KEY.match(msg, i)
        if m is None:
            j = i
            while j < n and not msg[j].isspace():
                j += 1
            words.append(msg[i:j])
            i = j
            continue
        key, j = m.group(1), m.end()
        if j < n and msg[j] in "'\"":
            end = _scan_quoted(msg, j)
            raw = msg[j:end]
            val = _literal(raw)
        elif j < n and msg[j] in _CLOSE:
            end = _scan_bracketed(msg, j)
            raw = msg[j:end]
            val = _literal(raw)
        else:
            end = j
            while end < n and not msg[end].isspace():
                end += 1
            raw = msg[j:end]
            val = _bare(raw)
        pairs.append((key, val, raw))
        i = end
    return pairs, " ".join(words)


def _jsonable(v: object) -> object:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted((_jsonable(x) for x in v), key=str)
    return str(v)


_SPEC = r"%[#0\- +]*(?:\d+)?(?:\.\d+)?([diouxXeEfFgGcrsa])"
_FIELD = re.compile(r"(?:(?<=\s)|^)([A-Za-z_][A-Za-z0-9_.\-]*)=" + _SPEC + r"(?=\s|$)")
_ANY_SPEC = re.compile(r"%%|" + _SPEC)
_MARK = "\x00{}\x00"  # stands in for a placeholder while the format string is parsed


def _arg_value(conv: str, spec: str, arg: object) -> tuple[object, str]:
    """(the field's value, how kv writes it) for one `key=%X` argument."""
    if conv == "r":
        shown = repr(arg)
        if isinstance(arg, (str, int, float, bool, dict, list, tuple)) or arg is None:
            return arg, shown
        return shown, shown
    if conv in "sa":
        if arg is None or isinstance(arg, (str, bool, int, float, dict, list, tuple)):
            return arg, value(arg) if isinstance(arg, str) else value(str(arg))
        return str(arg), value(str(arg))
    text = spec % arg
    if conv in "diouxXc":
        return (int(arg) if conv in "diu" else text), text
    try:
        return float(text), text
    except ValueError:
        return text, text


def fields(record: logging.LogRecord) -> tuple[list[tuple[str, object, str]], str] | None:
    """(key, value, kv text) per field from the format string and its arguments, and the
    words that are not fields; None when the message is not in that form (then `parse`
    reads the rendered message)."""
    msg, args = record.msg, record.args
    if not isinstance(msg, str) or not args or not isinstance(args, tuple):
        return None
    found = list(_FIELD.finditer(msg))
    if len(found) != len(args) or sum(1 for m in _ANY_SPEC.finditer(msg) if m.group(0) != "%%") != len(args):
        return None
    values: list[tuple[object, str]] = []
    out, last = [], 0
    for i, (m, arg) in enumerate(zip(found, args)):
        conv = m.group(2)
        spec = m.group(0)[len(m.group(1)) + 1:]
        try:
            values.append(_arg_value(conv, spec, arg))
        except (TypeError, ValueError):
            return None
        out.append(msg[last:m.start()].replace("%%", "%"))
        out.append(f"{m.group(1)}={_MARK.format(i)}")
        last = m.end()
    out.append(msg[last:].replace("%%", "%"))
    pairs, text = parse("".join(out))
    result = []
    for k, v, raw in pairs:
        if raw.startswith("\x00") and raw.endswith("\x00") and raw[1:-1].isdigit():
            val, shown = values[int(raw[1:-1])]
            result.append((k, val, shown))
        else:
            result.append((k, v, raw))
    return result, text


def one_line(msg: str) -> str:
    """The message unchanged if it is one clean line, else re-written so that it is."""
    if not _UNSAFE.search(msg):
        return msg
    pairs, text = parse(msg)
    parts = [f"{k}={value(v if isinstance(v, str) else raw) if _UNSAFE.search(raw) else raw}"
             for k, v, raw in pairs]
    if text:
        parts.append(f"msg={value(text)}")
    return " ".join(parts)


class KvFormatter(logging.Formatter):
    """`ts=... level=... logger=... <message>`, always one line (tracebacks repr-quoted)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        got = fields(record)
        if got is None:
            body = one_line(record.getMessage())
        else:
            pairs, text = got
            body = " ".join([f"{k}={shown if not _UNSAFE.search(shown) else value(repr(shown))}"
                             for k, _v, shown in pairs] + ([f"msg={value(text)}"] if text else []))
        line = f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname} logger={record.name} {body}"
        if record.exc_info:
            line += f" exc={value(self.formatException(record.exc_info))}"
        if record.stack_info:
            line += f" stack={value(self.formatStack(record.stack_info))}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, then the message's key=value fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                                  "logger": record.name}
        pairs, text = fields(record) or parse(record.getMessage())
        for k, v, _raw in pairs:
            while k in doc:  # a field never overwrites ts/level/logger or an earlier field
                k += "_"
            doc[k] = _jsonable(v)
        if text:
            doc["msg"] = text
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(doc, ensure_ascii=False)
        # valid JSON, but splitlines() and some collectors break lines there
        return line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")


def set_level(level: str) -> None:
    """Change the level of every splitserve logger (also used by a live config edit)."""
    lv = level.upper()
    if lv not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    logging.getLogger("splitserve").setLevel(lv)


def setup_logging(level: str = "INFO", fmt: str = "kv") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KvFormatter())
    root = logging.getLogger("splitserve")
    root.handlers[:] = [handler]
    set_level(level)
    root.propagate = False
