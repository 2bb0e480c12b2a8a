"""model.yaml: what a model declares about itself (signature, device, policy, batching).

Validated whole on read with pydantic; a bad file raises `SpecError` naming the field at
fault, and the caller keeps the model's last good spec.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


# Fields whose change leaves the loaded weights valid: applied in place, never reloaded.
IN_PLACE_FIELDS = ("version_policy", "load_timeout_s", "max_queue_size", "version_swap")
IN_PLACE_BATCHING = ("max_queue_delay_us", "preferred_batch_sizes", "max_queue_size")


class ModelSpec(_Strict):
    inputs: list[TensorDecl] | None = None
    outputs: list[TensorDecl] | None = None
    max_batch_size: int = Field(default=0, ge=0, le=1_000_000)
    device: str = "auto"
    warmup: bool = True
    version_policy: Literal["all"] | LatestPolicy | SpecificPolicy = LatestPolicy(latest=1)
    entry_point: str = "build_model"  # function (or class) in model.py that builds the module
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batching: Batching = Batching()
    load_timeout_s: float = Field(default=120.0, gt=0)
    max_queue_size: int = Field(default=1024, ge=1, le=1_000_000)  # per version, every path
    # availability_preserving: the new version serves before the old one unloads (default);
    # resource_preserving: unload first, then load (TF Serving's option for models too
    # large to hold twice; requests to the model fail over or wait meanwhile).
    version_swap: Literal["availability_preserving", "resource_preserving"] = "availability_preserving"

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
        raise ValueError(f"device {v!r}: expected auto, cpu, cuda or cuda:N")

    @field_validator("entry_point")
    @classmethod
    def _entry(cls, v: str) -> str:
        if not v.isidentifier():
            raise ValueError(f"entry_point {v!r} must be a Python identifier in model.py")
        return v

    def declared_signature(self) -> Signature | None:
        if self.inputs is None or self.outputs is None:
            return None
        return Signature(tuple(t.spec() for t in self.inputs),
                         tuple(t.spec() for t in self.outputs), self.max_batch_size)


DEFAULT_SPEC = ModelSpec()


def parse_spec(text: str, source: str = SPEC_FILE) -> ModelSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: invalid YAML: {e}") from None
    if data is None:
        return DEFAULT_SPEC
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors())
        raise SpecError(f"{source}: {problems}") from None


def read_spec(model_dir: Path) -> ModelSpec:
    path = model_dir / SPEC_FILE
    if not path.exists():
        return DEFAULT_SPEC
    return parse_spec(path.read_text(encoding="utf-8"), str(path))
