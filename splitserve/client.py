"""A client for a splitserve server: inference, routing, experiments and feedback over REST.

Stdlib HTTP (urllib) and numpy only, so `import splitserve` adds no dependency and works
beside any HTTP library the caller has. Tensors travel in the KServe v2 binary extension
(raw bytes after a JSON header, both ways), not as JSON lists. A torch tensor is accepted
where an array is (moved to the CPU first); `Result.torch()` gives torch tensors back.
Every non-2xx answer is raised as a `SplitserveError` subclass carrying the server's
one-line message, the status, and the request id/version the server attributed it to.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

_V2_TYPES = {np.dtype(k): v for k, v in {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64"}.items()}
_NP_TYPES = {v: k for k, v in _V2_TYPES.items()}
_HEADER_LEN = "inference-header-content-length"


# ---- errors ---------------------------------------------------------------------------
class SplitserveError(Exception):
    """The server said no (or could not be reached). `str(e)` is its one-line message."""

    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None, request_id: str | None = None,
                 version: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status if status is not None else type(self).status
        self.request_id = request_id
        self.version = version


class InvalidArgument(SplitserveError):
    status = 400


class Unauthenticated(SplitserveError):
    status = 401


class NotFound(SplitserveError):
    status = 404


class RequestTimeout(SplitserveError):
    status = 408


class Conflict(SplitserveError):
    """The state is owned elsewhere (e.g. routing in a read-only ConfigMap)."""
    status = 409


class TooLarge(SplitserveError):
    status = 413


class Overloaded(SplitserveError):
    """429: the server is at its in-flight limit; retry after a moment."""
    status = 429


class ServerError(SplitserveError):
    status = 500


class Unavailable(SplitserveError):
    status = 503


class DeadlineExceeded(SplitserveError):
    status = 504


class ConnectionFailed(SplitserveError):
    """No HTTP answer at all: refused, reset, DNS, or the client's timeout."""


_BY_STATUS = {c.status: c for c in (InvalidArgument, Unauthenticated, NotFound, RequestTimeout,
                                    Conflict, TooLarge, Overloaded, ServerError, Unavailable,
                                    DeadlineExceeded)}


def _error(status: int, body: bytes, headers: Mapping[str, str]) -> SplitserveError:
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    version = headers.get("x-model-version")
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else SplitserveError)
    return cls(str(message), status=status, request_id=headers.get("x-request-id"),
               version=int(version) if version and version.isdigit() else None)


# ---- tensors --------------------------------------------------------------------------
def _as_array(name: str, value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    arr = np.asarray(value)
    if arr.dtype.kind in "USO":
        return arr
    if arr.dtype not in _V2_TYPES:
        raise InvalidArgument(f"input '{name}': dtype {arr.dtype} has no KServe v2 datatype")
    return np.ascontiguousarray(arr)


def _encode(inputs: Mapping[str, Any], parameters: dict) -> tuple[bytes, int]:
    tensors, chunks = [], []
    for name, value in inputs.items():
        arr = _as_array(name, value)
        t = {"name": name, "shape": list(arr.shape)}
        if arr.dtype.kind in "USO":
            t.update(datatype="BYTES", data=[x.decode() if isinstance(x, bytes) else str(x)
                                             for x in arr.reshape(-1)])
        else:
            raw = arr.tobytes()
            t.update(datatype=_V2_TYPES[arr.dtype], parameters={"binary_data_size": len(raw)})
            chunks.append(raw)
        tensors.append(t)
    header = json.dumps({"inputs": tensors, "parameters": parameters}).encode()
    return header + b"".join(chunks), len(header)


def _decode_outputs(doc: dict, binary: bytes) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for o in doc.get("outputs", []):
        dt, shape = o["datatype"], tuple(o["shape"])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            data = o.get("data", [])
            arr = (np.array(data, dtype=object) if dt == "BYTES"
                   else np.array(data, dtype=np.float32 if dt == "BF16" else _NP_TYPES[dt]))
        else:
            raw = binary[offset:offset + size]
            offset += size
            if dt == "BYTES":
                items, i = [], 0
                while i < len(raw):
                    n = int.from_bytes(raw[i:i + 4], "little")
                    items.append(raw[i + 4:i + 4 + n])
                    i += 4 + n
                arr = np.array(items, dtype=object)
            elif dt == "BF16":  # numpy has no bfloat16: the same values as float32
                arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype=_NP_TYPES[dt])
        out[o["name"]] = arr.reshape(shape)
    return out


@dataclass(frozen=True)
class Result:
    """One inference answer: `outputs` (name -> numpy array), the version that served it,
    how it was chosen (`route`: split, sticky, pinned, label) and its request id."""

    outputs: dict[str, np.ndarray]
    version: int
    request_id: str
    route: str = ""
    model: str = ""
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]

    def torch(self) -> dict[str, Any]:
        """The outputs as torch tensors (needs torch installed)."""
        import torch
        return {k: torch.from_numpy(np.array(v)) for k, v in self.outputs.items()
                if v.dtype != object}


# ---- the client -----------------------------------------------------------------------
class Client:
    """Client("http://127.0.0.1:8000", token=None, timeout=30.0).

    `token` is sent as a bearer token (the server's --token-file) on every call; reads
    work without one. Blocking; thread-safe (no connection state is kept).
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"server URL must be http://HOST:PORT or https://..., got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._sticky: dict[str, dict | None] = {}

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # -- transport
    def _call(self, method: str, path: str, body: bytes | None = None,
              headers: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
        h = {"accept": "application/json", **(headers or {})}
        if body is not None and "content-type" not in h:
            h["content-type"] = "application/json"
        if self.token:
            h["authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read(), {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as e:
            with e:
                raise _error(e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConnectionFailed(f"{method} {self.url}{path}: {reason}") from None

    def _json(self, method: str, path: str, doc: Any = None) -> Any:
        body = None if doc is None else json.dumps(doc).encode()
        raw, _ = self._call(method, path, body)
        return json.loads(raw) if raw else {}

    @staticmethod
    def _m(model: str) -> str:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty name, got {model!r}")
        return urllib.parse.quote(model, safe="")

    # -- health
    def ready(self) -> bool:
        """True when the server answers /v2/health/ready with 200."""
        try:
            self._call("GET", "/v2/health/ready")
            return True
        except SplitserveError:
            return False

    # -- inference
    def predict(self, model: str, inputs: Mapping[str, Any], *, version: int | None = None,
                label: str | None = None, key: str | None = None,
                outputs: list[str] | None = None) -> Result:
        """Run `model` on `inputs` (name -> numpy array, torch tensor or nested list).

        Routed by the server's split unless `version` pins one or `label` names one;
        `key` is the sticky key (sent as the header or parameter the model's routing
        names, so the same key always reaches the same version).
        """
        if not inputs:
            raise ValueError("inputs must name at least one tensor")
        if version is not None and label is not None:
            raise ValueError("give version or label, not both")
        path = f"/v2/models/{self._m(model)}" + (f"/versions/{int(version)}" if version is not None else "") + "/infer"
        params: dict[str, Any] = {"binary_data_output": True}
        if label is not None:
            params["label"] = label
        headers = {}
        if key is not None:
            sticky = self._sticky_of(model)
            if sticky and sticky.get("header"):
                headers[sticky["header"]] = str(key)
            elif sticky and sticky.get("parameter"):
                params[sticky["parameter"]] = str(key)
            else:
                raise ValueError(f"model '{model}' has no sticky routing (no 'sticky' in "
                                 "its routing), so a key would not pin anything")
        body, hlen = _encode(inputs, params)
        if outputs is not None:
            doc = json.loads(body[:hlen])
            doc["outputs"] = [{"name": n} for n in outputs]
            header = json.dumps(doc).encode()
            body, hlen = header + body[hlen:], len(header)
        headers.update({"content-type": "application/octet-stream", _HEADER_LEN: str(hlen)})
        raw, h = self._call("POST", path, body, headers)
        jlen = int(h.get(_HEADER_LEN, len(raw)))
        doc = json.loads(raw[:jlen])
        return Result(outputs=_decode_outputs(doc, raw[jlen:]),
                      version=int(h.get("x-model-version") or doc.get("model_version")),
                      request_id=h.get("x-request-id", doc.get("id", "")), route=h.get("x-route", ""),
                      model=doc.get("model_name", model), headers=h)

    def _sticky_of(self, model: str) -> dict | None:
        if model not in self._sticky:
            self._sticky[model] = self.routing(model).get("sticky")
        return self._sticky[model]

    # -- routing
    def routing(self, model: str) -> dict:
        """The model's routing: labels, weights, sticky, shadow, and `effective` (what serves)."""
        return self._json("GET", f"/v1/models/{self._m(model)}/routing")

    def put_routing(self, model: str, doc: Mapping[str, Any]) -> dict:
        """Replace the model's routing whole (validated whole; persisted by the server)."""
        self._sticky.pop(model, None)
        return self._json("PUT", f"/v1/models/{self._m(model)}/routing", dict(doc))

    # -- experiments and feedback
    def experiment(self, model: str) -> dict:
        """The experiment's state, step, per-arm counts, evidence and decisions."""
        return self._json("GET", f"/v1/models/{self._m(model)}/experiment")

    def experiment_action(self, model: str, action: str) -> dict:
        """promote, rollback, pause, resume or retry; answers the experiment after it."""
        return self._json("POST", f"/v1/models/{self._m(model)}/experiment/"
                                  f"{urllib.parse.quote(action, safe='')}")

    def promote(self, model: str) -> dict:
        return self.experiment_action(model, "promote")

    def rollback(self, model: str) -> dict:
        return self.experiment_action(model, "rollback")

    def pause(self, model: str) -> dict:
        return self.experiment_action(model, "pause")

    def resume(self, model: str) -> dict:
        return self.experiment_action(model, "resume")

    def retry(self, model: str) -> dict:
        return self.experiment_action(model, "retry")

    def feedback(self, model: str, items: list[Mapping[str, Any]]) -> dict:
        """Outcomes by request id: [{"request_id", "metric", "value"}] -> {"matched", ...}."""
        return self._json("POST", f"/v1/models/{self._m(model)}/feedback",
                          {"items": [dict(i) for i in items]})


class AsyncClient:
    """The same calls as `Client`, awaitable. Each runs the blocking client in the default
    executor (a thread), so it never blocks the event loop; it is not a native async
    HTTP client (no connection pooling), which keeps `splitserve` free of dependencies."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0):
        self.sync = Client(url, token=token, timeout=timeout)

    def __repr__(self) -> str:
        return f"AsyncClient({self.sync.url!r})"

    def __getattr__(self, name: str):
        fn = getattr(self.sync, name)
        if name.startswith("_") or not callable(fn):
            return fn

        async def call(*args, **kwargs):
            return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))

        call.__name__ = name
        call.__doc__ = fn.__doc__
        return call

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        return None
