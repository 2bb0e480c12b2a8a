"""Values shared by every layer: no wire types, no torch.

Tensors travel as numpy arrays tagged with their v2 datatype name. BF16 has no numpy
dtype, so a BF16 tensor carries its raw bits as uint16 and the executor reinterprets
them (`torch.from_numpy(a).view(torch.bfloat16)`), which costs no copy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class VersionState(enum.Enum):
    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True, order=True)
class ServableId:
    model: str
    version: int

    def __str__(self) -> str:
        return f"{self.model}:{self.version}"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str  # v2 name: FP32, INT64, BOOL, ...
    shape: tuple[int, ...]  # -1 marks a variable dimension; includes the batch dim


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0  # 0: the model does not batch (first dim is not a batch dim)
    derived: bool = False  # True when not declared in model.yaml but derived at load


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # C-contiguous, reshaped to `shape`; BF16 as uint16 bits
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    """One protocol-neutral request. `version` pins; `label` pins by name; neither routes.

    `headers` (HTTP headers or gRPC metadata) and `parameters` are the routing inputs the
    inference core reads the sticky key from. A protocol whose body is typed by the
    model's signature (TF Serving JSON) leaves `inputs` empty and gives `decode`, which the
    core calls with the signature of the version it routed to.
    """

    model: str
    inputs: list[Tensor]
    version: int | None = None
    label: str | None = None
    routing_key: str | None = None  # set by the core from headers/parameters
    outputs: list[str] | None = None  # requested output names; None = all
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    protocol: str = "internal"  # rest_v2, grpc_v2, rest_tfs: for metrics only
    headers: Any = None  # a read-only mapping; None: no headers
    decode: Any = None  # Callable[[Signature], tuple[list[Tensor], list[str] | None]]
    timeout_s: float | None = None  # this request's inference deadline; None: limits.request_timeout_s


@dataclass(slots=True)
class InferResponse:
    model: str
    version: int  # the version that served
    outputs: list[Tensor]
    id: str | None = None
    route: str = "split"  # how the version was chosen: split, sticky, pinned, label
    parameters: dict[str, Any] = field(default_factory=dict)
