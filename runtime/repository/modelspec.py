"""model.yaml: what a model declares about itself (signature, device, policy, batching).

Validated whole on read with pydantic; a bad file raises `SpecError`, one line in our
words (not pydantic's) that names the field at fault, suggests the closest valid name for
an unknown one, and shows the path relative to the repository. The caller keeps the
model's last good spec.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)

from router import yamltext
from runtime import dtypes
from runtime.types import Signature, TensorSpec

SPEC_FILE = "model.yaml"


class SpecError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorDecl(_Strict):
    name: str = Field(min_length=1)
    datatype: str
    shape: list[int]

    @field_validator("datatype")
    @classmethod
    def _known(cls, v: str) -> str:
        v = v.upper()
        if v.startswith("TYPE_"):  # Triton config spelling
            v = "BYTES" if v == "TYPE_STRING" else v[5:]
        if not dtypes.is_supported(v) and v != "BYTES":
            raise ValueError(f"unknown datatype {v!r}; expected one of {', '.join(dtypes.SUPPORTED)}")
        return v

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d == 0 or d < -1 for d in v):
            raise ValueError(f"shape {v}: each dim must be a positive size or -1 (variable)")
        return v

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, tuple(self.shape))


class LatestPolicy(_Strict):
    latest: int = Field(ge=1)


class SpecificPolicy(_Strict):
    specific: list[int] = Field(min_length=1)

    @field_validator("specific")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError("versions must be positive integers")
        return v


class Batching(_Strict):
    """Dynamic batching per version: opt-in (`enabled: true`) as in Triton, where
    `max_batch_size` alone only marks the batch dimension. `exact: true` pads batches so
    that answers are bit-identical to unbatched ones (calibrated at load: slower swaps)."""

    ALIASES: ClassVar[tuple[str, ...]] = ("max_queue_delay_ms",)  # accepted, not fields
    enabled: bool = False
    exact: bool = False
    max_queue_delay_us: int = Field(default=2000, ge=0, le=10_000_000)
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_queue_size: int | None = Field(default=None, ge=1, le=1_000_000)  # alias of the model's

    @model_validator(mode="before")
    @classmethod
    def _ms_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_queue_delay_ms" in data:
            data = dict(data)
            ms = data.pop("max_queue_delay_ms")
            if not isinstance(ms, (int, float)) or isinstance(ms, bool) or ms < 0:
                raise ValueError("max_queue_delay_ms must be a non-negative number")
            data["max_queue_delay_us"] = int(ms * 1000)
        return data


def _policy_tag(v: Any) -> str | None:
    """Which form of version_policy a value is, so errors come from that form only."""
    if v == "all":
        return "all"
    for tag, cls in POLICY_FORMS.items():
        if isinstance(v, cls) or (isinstance(v, dict) and tag in v):
            return tag
    return None


POLICY_FORMS: dict[str, type[BaseModel]] = {"latest": LatestPolicy, "specific": SpecificPolicy}
POLICY_EXPECTED = "all, {latest: N} or {specific: [N, ...]}"
VersionPolicy = Annotated[
    Union[Annotated[Literal["all"], Tag("all")], Annotated[LatestPolicy, Tag("latest")],
          Annotated[SpecificPolicy, Tag("specific")]],
    Discriminator(_policy_tag, custom_error_type="version_policy_form",
                  custom_error_message=f"expected {POLICY_EXPECTED}")]


# Fields whose change leaves the loaded weights valid: applied in place, never reloaded.
IN_PLACE_FIELDS = ("version_policy", "load_timeout_s", "max_queue_size", "version_swap", "execution")
IN_PLACE_BATCHING = ("max_queue_delay_us", "preferred_batch_sizes", "max_queue_size")


class ModelSpec(_Strict):
    inputs: list[TensorDecl] | None = None
    outputs: list[TensorDecl] | None = None
    max_batch_size: int = Field(default=0, ge=0, le=1_000_000)
    device: str = "auto"
    warmup: bool = True
    version_policy: VersionPolicy = LatestPolicy(latest=1)
    entry_point: str = "build_model"  # function (or class) in model.py that builds the module
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batching: Batching = Batching()
    load_timeout_s: float = Field(default=120.0, gt=0)
    max_queue_size: int = Field(default=1024, ge=1, le=1_000_000)  # per version, every path
    # availability_preserving: the new version serves before the old one unloads (default);
    # resource_preserving: unload first, then load (TF Serving's option for models too
    # large to hold twice; requests to the model fail over or wait meanwhile).
    version_swap: Literal["availability_preserving", "resource_preserving"] = "availability_preserving"
    # Where unbatched CPU forwards run, for every version alike (runtime/lifecycle/manager.py,
    # `execution_rule`): auto measures them (inline when every version's warm forward is
    # at most repository.inline_forward_us), inline and executor say so outright.
    execution: Literal["auto", "inline", "executor"] = "auto"

    def queue_size(self) -> int:
        return self.batching.max_queue_size or self.max_queue_size

    def load_key(self) -> str:
        """What the weights depend on: a change here reloads, anything else applies in place."""
        data = self.model_dump(mode="json", exclude=set(IN_PLACE_FIELDS))
        for k in IN_PLACE_BATCHING:
            data["batching"].pop(k, None)
        return json.dumps(data, sort_keys=True)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"{v!r} is not a device; expected auto, cpu, cuda or cuda:N")

    @field_validator("entry_point")
    @classmethod
    def _entry(cls, v: str) -> str:
        if not v.isidentifier():
            raise ValueError(f"{v!r} is not a Python identifier (the name of a function in model.py)")
        return v

    def declared_signature(self) -> Signature | None:
        if self.inputs is None or self.outputs is None:
            return None
        return Signature(tuple(t.spec() for t in self.inputs),
                         tuple(t.spec() for t in self.outputs), self.max_batch_size)


DEFAULT_SPEC = ModelSpec()


def parse_spec(text: str, source: str = SPEC_FILE) -> ModelSpec:
    """`source` names the file in messages: relative to the repository (`mlp/model.yaml`)."""
    try:
        data = yamltext.load(text)
    except yamltext.YamlError as e:
        where = f" at line {e.line}" if e.line is not None else ""
        raise SpecError(f"invalid YAML in {source}{where}: {e.problem}") from None
    if data is None:
        return DEFAULT_SPEC
    if not isinstance(data, dict):
        raise SpecError(f"{source} must be a mapping of fields (inputs, max_batch_size, ...), "
                        f"not a {type(data).__name__}")
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(describe_errors(e.errors(), source)) from None


def read_spec(model_dir: Path) -> ModelSpec:
    path = model_dir / SPEC_FILE
    if not path.exists():
        return DEFAULT_SPEC
    source = f"{model_dir.name}/{SPEC_FILE}"  # relative to the repository: no server paths
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{source} could not be read as UTF-8 text: "
                        f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}") from None
    return parse_spec(text, source)


# ---- errors in our words -------------------------------------------------------------

_EXPECTED = {  # pydantic error type -> what the field takes
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
    "model_type": "a mapping", "model_attributes_type": "a mapping",
}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
MAX_PROBLEMS = 3


def _strip_tags(loc: tuple) -> tuple:
    """pydantic puts the chosen union member into the location; users never wrote it."""
    if len(loc) > 1 and loc[0] == "version_policy" and loc[1] in ("all", *POLICY_FORMS):
        return loc[:1] + loc[2:]
    return loc


def _fields_at(loc: tuple, raw: tuple) -> tuple[str, ...]:
    """The keys accepted where the last part of `loc` sits (`raw`: loc with union tags)."""
    parent = loc[:-1]
    if not parent:
        return tuple(ModelSpec.model_fields)
    if parent[0] in ("inputs", "outputs") and len(parent) == 2:
        return tuple(TensorDecl.model_fields)
    if parent == ("batching",):
        return tuple(Batching.model_fields) + Batching.ALIASES
    if parent == ("version_policy",):
        form = POLICY_FORMS.get(raw[1]) if len(raw) > 2 else None
        return tuple(form.model_fields) if form else tuple(POLICY_FORMS)
    return ()


def field_name(loc: tuple) -> str:
    """('inputs', 0, 'datatype') -> 'inputs[0].datatype' (how the user sees it in YAML)."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _show(v: Any, limit: int = 60) -> str:
    text = repr(v) if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def unknown_field(loc: tuple, candidates: tuple[str, ...]) -> tuple[str, str, str | None]:
    """(`unknown field 'max_batchsize'`, `; did you mean 'max_batch_size'?`, the match)."""
    close = difflib.get_close_matches(str(loc[-1]), candidates, n=1, cutoff=0.6)
    if close:
        tail = f"; did you mean {field_name(loc[:-1] + (close[0],))!r}?"
    else:
        where = f" under {field_name(loc[:-1])}" if loc[:-1] else ""
        tail = f"; the fields{where} are {', '.join(candidates) or 'none'}"
    return f"unknown field {field_name(loc)!r}", tail, close[0] if close else None


def _problem(err: dict) -> tuple[str, str, tuple, str | None]:
    """(what is wrong with which field, what was expected, the field's location, the
    field name suggested for an unknown key or None)."""
    raw = tuple(err["loc"])
    loc = _strip_tags(raw)
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        head, tail, close = unknown_field(loc, _fields_at(loc, raw))
        return head, tail, loc, close
    if kind == "missing":
        return f"missing field {field_name(loc)!r}", " (required)", loc, None
    if kind == "version_policy_form" and isinstance(value, dict) and value:
        return (*unknown_field(loc + (next(iter(value)),), tuple(POLICY_FORMS))[:2], loc, None)
    if kind == "value_error":
        why = f": {ctx.get('error', err['msg'])}"
    elif kind == "version_policy_form":
        why = f": {_show(value)}; expected {POLICY_EXPECTED}"
    elif kind in _EXPECTED:
        why = f": {_show(value)}; expected {_EXPECTED[kind]}"
    elif kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        why = f": {_show(value)}; expected a number {op} {_num(ctx.get(key))}"
    elif kind == "too_short":
        why = f": {_show(value)}; expected at least {ctx.get('min_length')} item(s)"
    elif kind == "literal_error":
        why = f": {_show(value)}; expected {ctx.get('expected')}"
    else:
        why = f": {_show(value)}; {err['msg'][0].lower()}{err['msg'][1:]}"
    return f"invalid {field_name(loc)!r}", why, loc, None


def describe_errors(errs: list[dict], source: str) -> str:
    """pydantic's errors -> one line in our words: `<problem> in <source><expected>`,
    further problems joined by '; '. A field reported missing because its key was
    misspelt is dropped (the unknown-key message suggests it); a list of valid fields
    is given once."""
    problems = [_problem(e) for e in errs]
    suggested = {loc[:-1] + (s,) for _, _, loc, s in problems if s is not None}
    out, tails = [], set()
    for head, tail, loc, _ in problems:
        if head.startswith("missing field") and loc in suggested:
            continue
        if tail.startswith("; the fields") and tail in tails:
            tail = ""
        tails.add(tail)
        msg = f"{head} in {source}{tail}" if not out else f"{head}{tail}"
        if msg not in out:
            out.append(msg)
    more = len(out) - MAX_PROBLEMS
    return "; ".join(out[:MAX_PROBLEMS]) + (f" (and {more} more)" if more > 0 else "")
