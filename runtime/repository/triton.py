"""Triton's config.pbtxt, read as a model.yaml, so a Triton repository serves as it is.

A model folder with `config.pbtxt` and no `model.yaml` is described by it: platform
`pytorch_libtorch` (backend `pytorch`) with `<version>/model.pt` (TorchScript, inputs
passed positionally as Triton's INPUT__0, INPUT__1, ... are), `input`/`output` with
Triton's names, data types and dims (the batch dimension added when
`max_batch_size` > 0), `max_batch_size`, `dynamic_batching` and `version_policy`.
Anything else Triton would act on is listed as unsupported, one line per field, through
the scan's `ignored` entries: never silence, never a refusal of the whole model.

The text format is parsed here (a small tokenizer, no schema) rather than with Triton's
generated `model_config_pb2`: that lives in runtime/protocol, above this folder, and the
fields splitserve acts on are few; an unknown or misspelt field is then one more line.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from runtime.repository.modelspec import ModelSpec, SpecError, describe_errors

CONFIG_FILE = "config.pbtxt"
PLATFORMS = {("platform", "pytorch_libtorch"), ("backend", "pytorch")}
SUPPORTED = ("name", "platform", "backend", "max_batch_size", "input", "output",
             "dynamic_batching", "version_policy")
TENSOR_FIELDS = ("name", "data_type", "dims")
BATCHING_FIELDS = ("max_queue_delay_microseconds", "preferred_batch_size")
_TOKEN = re.compile(r"""\s+|\#[^\n]*|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<punct>[{}\[\]:,;<>])|(?P<word>[^\s{}\[\]:,;<>"'#]+)""")


class _Tokens:
    def __init__(self, text: str, source: str):
        self.items: list[tuple[str, str, int]] = []
        self.source = source
        pos, line = 0, 1
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise SpecError(f"{source} line {line}: cannot read {text[pos:pos + 20]!r}")
            kind = m.lastgroup
            if kind is not None:
                self.items.append((kind, m.group(kind), line))
            line += m.group(0).count("\n")
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.items[self.i] if self.i < len(self.items) else None

    def take(self, want: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            raise SpecError(f"{self.source}: ends too early" + (f", expected {want!r}" if want else ""))
        if want is not None and tok[1] != want:
            raise SpecError(f"{self.source} line {tok[2]}: expected {want!r}, got {tok[1]!r}")
        self.i += 1
        return tok


def _value(t: _Tokens) -> Any:
    kind, text, line = t.take()
    if text in ("{", "<"):
        return _message(t, "}" if text == "{" else ">")
    if text == "[":
        out = []
        while t.peek() and t.peek()[1] != "]":
            out.append(_value(t))
            if t.peek() and t.peek()[1] == ",":
                t.take()
        t.take("]")
        return out
    if kind == "str":
        return bytes(text[1:-1], "utf-8").decode("unicode_escape")
    if kind != "word":
        raise SpecError(f"{t.source} line {line}: unexpected {text!r}")
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return {"true": True, "false": False}.get(text, text)  # an enum name stays a string


def _message(t: _Tokens, end: str | None) -> dict[str, list]:
    """Fields -> list of values (a repeated field, or a list, gives several)."""
    out: dict[str, list] = {}
    while True:
        tok = t.peek()
        if tok is None:
            if end is not None:
                raise SpecError(f"{t.source}: ends too early, expected {end!r}")
            return out
        if tok[1] == end:
            t.take()
            return out
        kind, name, line = t.take()
        if kind != "word":
            raise SpecError(f"{t.source} line {line}: expected a field name, got {name!r}")
        if t.peek() and t.peek()[1] == ":":
            t.take()
        v = _value(t)
        out.setdefault(name, []).extend(v if isinstance(v, list) else [v])
        if t.peek() and t.peek()[1] in (",", ";"):
            t.take()


def parse_pbtxt(text: str, source: str = CONFIG_FILE) -> dict[str, list]:
    return _message(_Tokens(text, source), None)


def _one(msg: dict, key: str, source: str, default: Any = None) -> Any:
    vals = msg.get(key, [])
    if len(vals) > 1:
        raise SpecError(f"{source}: {key} is given {len(vals)} times")
    return vals[0] if vals else default


def _unsupported(where: str, msg: dict, known: tuple[str, ...], notes: list[tuple[str, str]]) -> None:
    for key in msg:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        why = (f"unknown field; did you mean {close[0]!r}?" if close
               else "not supported by splitserve: ignored")
        notes.append((f"{CONFIG_FILE}: {where}{key}", why))


def triton_spec(text: str, source: str) -> tuple[ModelSpec, list[tuple[str, str]]]:
    """(the spec, [(field, why)] for each field it does not act on). SpecError when the
    model cannot be served at all (another platform, a bad tensor)."""
    cfg = parse_pbtxt(text, source)
    notes: list[tuple[str, str]] = []
    _unsupported("", cfg, SUPPORTED, notes)
    platform = _one(cfg, "platform", source)
    backend = _one(cfg, "backend", source)
    if ("platform", platform) not in PLATFORMS and ("backend", backend) not in PLATFORMS:
        got = f"platform {platform!r}" if platform else (f"backend {backend!r}" if backend else "no platform")
        raise SpecError(f"{source}: {got}; splitserve serves platform 'pytorch_libtorch' "
                        f"(backend 'pytorch') with <version>/model.pt")
    mbs = _one(cfg, "max_batch_size", source, 0)
    if not isinstance(mbs, int) or mbs < 0:
        raise SpecError(f"{source}: max_batch_size must be a non-negative integer, got {mbs!r}")
    data: dict[str, Any] = {"max_batch_size": mbs}
    for side in ("input", "output"):
        tensors = []
        for i, t in enumerate(cfg.get(side, [])):
            if not isinstance(t, dict):
                raise SpecError(f"{source}: {side}[{i}] must be a message {{ name: ... }}")
            _unsupported(f"{side}[{i}].", t, TENSOR_FIELDS, notes)
            dims = t.get("dims", [])
            tensors.append({"name": _one(t, "name", source), "datatype": _one(t, "data_type", source),
                            "shape": ([-1] if mbs > 0 else []) + list(dims)})
        if tensors:
            data[side + "s"] = tensors
    batching = _one(cfg, "dynamic_batching", source)
    if batching is not None:
        _unsupported("dynamic_batching.", batching, BATCHING_FIELDS, notes)
        data["batching"] = {"enabled": True,
                            "preferred_batch_sizes": batching.get("preferred_batch_size", [])}
        delay = _one(batching, "max_queue_delay_microseconds", source)
        if delay is not None:
            data["batching"]["max_queue_delay_us"] = delay
    policy = _one(cfg, "version_policy", source)
    if policy is not None:
        if "latest" in policy:
            data["version_policy"] = {"latest": _one(_one(policy, "latest", source), "num_versions", source, 1)}
        elif "all" in policy:
            data["version_policy"] = "all"
        elif "specific" in policy:
            data["version_policy"] = {"specific": _one(policy, "specific", source).get("versions", [])}
        else:
            raise SpecError(f"{source}: version_policy must be latest, all or specific")
    if ("inputs" in data) != ("outputs" in data):
        raise SpecError(f"{source}: declare both input and output, or neither")
    try:
        return ModelSpec.model_validate(data), notes
    except ValidationError as e:
        raise SpecError(describe_errors(e.errors(), source)) from None


def read_triton(model_dir: Path) -> tuple[ModelSpec, list[tuple[str, str]]]:
    source = f"{model_dir.name}/{CONFIG_FILE}"
    try:
        text = (model_dir / CONFIG_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{source} could not be read as UTF-8 text: {type(e).__name__}") from None
    return triton_spec(text, source)
