"""Turns a version folder into a loaded model on its device, warms it up, and frees it.

Runs on a loader thread, never on the event loop. Three formats:
`model.pt2` (torch.export ExportedProgram), `model.safetensors` + `model.py` (weights
loaded by safetensors straight onto the target device), `model.pt` (TorchScript).
Nothing here unpickles: no `torch.load` at all, so no code runs from a weights file.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime import dtypes

from runtime.execution import transfer
from runtime.repository.modelspec import ModelSpec
from runtime.repository.scan import architecture_file, inside
from runtime.types import Signature, TensorSpec

log = logging.getLogger("splitserve.loader")
_import_lock = threading.Lock()
_import_seq = 0


class LoadError(Exception):
    """A version could not be loaded; the message is shown as the FAILED reason."""


def resolve_device(spec: ModelSpec) -> torch.device:
    want = spec.device
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(want)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(f"device {want!r} requested in model.yaml but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LoadError(f"device {want!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


@dataclass
class LoadedModel:
    """A model ready to run: call `forward` from its version's executor thread only."""

    module: object
    device: torch.device
    signature: Signature
    format: str
    memory_bytes: int = 0
    load_s: float = 0.0
    warmup_s: float = 0.0
    stream: object = None  # a CUDA stream per version so versions don't serialize
    forward_s: float | None = None  # warm forward time of the first warmup sample, 1 thread
    sample_numel: int = 0  # input elements of that sample

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """inputs in signature order (CPU tensors) -> outputs in signature order (CPU).
        On CUDA: inputs go up from pinned memory, outputs come back in one copy
        (runtime/execution/transfer.py), all on the version's stream."""
        dev = self.device
        with torch.inference_mode():
            if dev.type == "cuda":
                with torch.cuda.stream(self.stream):
                    out = self.module(*transfer.to_device(inputs, dev))
                    outs = transfer.to_host(_as_list(out, self.signature))
                    self.stream.synchronize()
                return outs
            return _as_list(self.module(*inputs), self.signature)

    def release(self) -> None:
        """Drop every reference we hold; the caller drops its reference to self."""
        self.module = None
        self.stream = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # cuBLAS keeps a workspace per (handle, stream) in the caching allocator; our
            # per-version stream would otherwise pin ~32 MiB after unload. Workspaces of
            # versions still serving are re-created lazily on their next matmul.
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()
            torch.cuda.empty_cache()


def _as_list(out, signature: Signature) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[o.name] for o in signature.outputs]
    if isinstance(out, (list, tuple)):
        return list(out)
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, tuple or dict")


def _param_bytes(module) -> int:
    seen, total = set(), 0
    tensors = []
    if hasattr(module, "parameters"):
        tensors += list(module.parameters())
    if hasattr(module, "buffers"):
        tensors += list(module.buffers())
    for t in tensors:
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _spec_of(name: str, val) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in val.shape)
    return TensorSpec(name, dtypes.from_torch(val.dtype), shape)


def _load_pt2(path: Path, device: torch.device, spec: ModelSpec):
    ep = torch.export.load(str(path))
    sig = None
    try:
        placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        ins = tuple(_spec_of(name, placeholders[name].meta["val"])
                    for name in ep.graph_signature.user_inputs)
        out_node = next(n for n in ep.graph.nodes if n.op == "output")
        user_outs = [a for a in out_node.args[0]][-len(ep.graph_signature.user_outputs):]
        outs = tuple(_spec_of(f"output{i}", a.meta["val"]) for i, a in enumerate(user_outs))
        dynamic_batch = all(s.shape and s.shape[0] == -1 for s in ins)
        sig = Signature(ins, outs, spec.max_batch_size or (1 << 16 if dynamic_batch else 0), True)
    except Exception as e:  # derivation is a convenience; the model still loads
        log.debug("signature derivation failed for %s: %s", path, e)
    module = ep.module()
    if sig is not None and _guarded_flat(module, len(sig.inputs)):
        # The graph's own guards (`_guards_fn`) still check every shape; what this skips is
        # the pre-hook's pytree match of the call's structure, which our one call site
        # (`LoadedModel.forward`: the signature's tensors, positionally) always satisfies.
        # It was ~40% of a small exported model's call (bench: 79 -> 47 us for the mlp).
        module.validate_inputs = False
    module.to(device)
    return module, sig


def _guarded_flat(module, n_inputs: int) -> bool:
    """True when the exported module checks shapes in its graph and takes exactly
    `n_inputs` positional tensors and no keyword arguments."""
    spec = getattr(module, "_in_spec", None)
    if not hasattr(module, "_guards_fn") or not hasattr(module, "validate_inputs") or spec is None:
        return False
    def kids(t):  # `children()` from torch 2.10; `children_specs` before (deprecated since)
        return list(t.children()) if callable(getattr(t, "children", None)) else list(t.children_specs)

    try:
        args, kwargs = kids(spec)
        return (spec.type is tuple and args.type is tuple and kwargs.type is dict
                and kwargs.num_children == 0 and args.num_children == n_inputs
                and all(c.is_leaf() for c in kids(args)))
    except (AttributeError, ValueError, TypeError):
        return False


def _import_architecture(path: Path):
    global _import_seq
    with _import_lock:
        _import_seq += 1
        name = f"_splitserve_arch_{_import_seq}"
        mspec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(mspec)
        try:
            mspec.loader.exec_module(mod)
        except Exception as e:
            raise LoadError(f"{path.name} raised while importing: {type(e).__name__}: {e}") from e
        finally:
            sys.modules.pop(name, None)
    return mod


def _load_safetensors(path: Path, device: torch.device, spec: ModelSpec):
    from safetensors.torch import load_file

    arch = architecture_file(path.parent.parent, path.parent)
    if arch is None:
        raise LoadError("model.safetensors needs a model.py in the version or model folder")
    if not inside(arch, path.parent.parent.parent) or not inside(path, path.parent.parent.parent):
        raise LoadError(f"{arch.name} or the weights link outside the model repository: refused")
    mod = _import_architecture(arch)
    build = getattr(mod, spec.entry_point, None)
    if build is None:
        raise LoadError(f"{arch.name} has no {spec.entry_point!r} (set entry_point in model.yaml)")
    try:
        state = load_file(str(path), device=str(device))
    except Exception as e:
        raise LoadError(f"model.safetensors could not be read: {e}") from e
    try:
        module = build(**spec.kwargs)
    except Exception as e:
        raise LoadError(f"{spec.entry_point}(**kwargs) raised: {type(e).__name__}: {e}") from e
    if not isinstance(module, torch.nn.Module):
        raise LoadError(f"{spec.entry_point} returned {type(module).__name__}, not an nn.Module")
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise LoadError(f"weights do not fit the architecture: {e}") from e
    module.to(device)  # buffers outside the state dict
    module.eval()
    return module, None


def _load_torchscript(path: Path, device: torch.device, spec: ModelSpec):
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as e:
        raise LoadError(f"model.pt is not a loadable TorchScript archive: {e}") from e
    module.eval()
    return module, None


_LOADERS = {"model.pt2": _load_pt2, "model.safetensors": _load_safetensors,
            "model.pt": _load_torchscript}


def _derive_from_forward(module, spec: ModelSpec) -> Signature:
    """Names from forward()'s parameters; dtype from the weights; shapes not checked."""
    fwd = getattr(module, "forward", module)
    try:
        params = [p for p in inspect.signature(fwd).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params if p.name != "self"] or ["input0"]
    except (TypeError, ValueError):
        names = ["input0"]
    dt = "FP32"
    for p in getattr(module, "parameters", lambda: [])():
        if p.is_floating_point():
            dt = dtypes.from_torch(p.dtype)
            break
    return Signature(tuple(TensorSpec(n, dt, (-1,)) for n in names),
                     (TensorSpec("output0", dt, (-1,)),), spec.max_batch_size, True)


def load_version(path: Path, fmt: str, spec: ModelSpec) -> LoadedModel:
    """Load one version folder; raises LoadError with a readable reason."""
    device = resolve_device(spec)
    t0 = time.perf_counter()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        module, derived = _LOADERS[fmt](path / fmt, device, spec)
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"{fmt}: {type(e).__name__}: {e}") from e
    sig = spec.declared_signature()
    if sig is None:
        sig = derived or _derive_from_forward(module, spec)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        mem = torch.cuda.memory_allocated(device) - before
        stream = torch.cuda.Stream(device)
    else:
        mem, stream = _param_bytes(module), None
    lm = LoadedModel(module, device, sig, fmt, mem, time.perf_counter() - t0, stream=stream)
    return lm


def warmup_inputs(lm: LoadedModel, version_dir: Path) -> list[list[torch.Tensor]]:
    """Samples from `warmup.json` (v2 request bodies) or synthetic ones from the signature."""
    sample_file = version_dir / "warmup.json"
    if sample_file.is_file():
        try:
            bodies = json.loads(sample_file.read_text())
            out = []
            for body in bodies:
                by_name = {t["name"]: t for t in body["inputs"]}
                row = []
                for s in lm.signature.inputs:
                    t = by_name[s.name]
                    dt = t.get("datatype", s.datatype)
                    arr = np.asarray(t["data"], dtype=dtypes.numpy_dtype(dt)).reshape(t["shape"])
                    row.append(dtypes.to_torch(arr, dt))
                out.append(row)
            return out
        except (KeyError, TypeError, ValueError) as e:
            raise LoadError(f"warmup.json is not a list of v2 request bodies: {e}") from e
    row = []
    for s in lm.signature.inputs:
        if s.datatype == "BYTES":
            return []
        shape = [1 if d == -1 else d for d in s.shape] or [1]
        row.append(torch.zeros(shape, dtype=dtypes.torch_dtype(s.datatype)))
    return [row]


TIMED_CALLS = 21


def time_forward(forward, row: list[torch.Tensor], calls: int = TIMED_CALLS) -> float:
    """The median of `calls` warm forwards with one intra-op thread, as inline runs it
    (runtime/execution/runner.py). The median of many, not the minimum of five: one lucky
    call must not put a version on the loop that costs more there under load."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            forward(row)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(prev)
    return sorted(times)[len(times) // 2]


def warmup(lm: LoadedModel, version_dir: Path) -> None:
    """Run the samples, then time the first one warm (`forward_s`: the inline decision).

    A model whose signature was guessed (no `inputs:` in model.yaml, no input shapes in
    the file, e.g. TorchScript) is not fed made-up shapes: it serves unwarmed, and the
    log says what to declare."""
    t0 = time.perf_counter()
    if (lm.signature.derived and any(s.shape == (-1,) for s in lm.signature.inputs)
            and not (version_dir / "warmup.json").is_file()):
        log.warning("event=warmup_skipped path=%s reason=%r", version_dir,
                    "input shapes unknown: declare inputs: and outputs: in model.yaml "
                    "(or ship a warmup.json) to warm it up before it serves")
        lm.warmup_s = time.perf_counter() - t0
        return
    try:
        rows = warmup_inputs(lm, version_dir)
        for row in rows:
            lm.forward(row)
        if rows:
            lm.forward_s = time_forward(lm.forward, rows[0])
            lm.sample_numel = sum(x.numel() for x in rows[0])
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"warmup failed: {type(e).__name__}: {e}") from e
    lm.warmup_s = time.perf_counter() - t0
