"""Read-only views of models for every protocol: v2 metadata, Triton model config,
repository index and version status, as plain dicts (adapters encode them)."""

from __future__ import annotations

from runtime import errors
from runtime.manager import Manager, ModelEntry
from runtime.repository import list_models
from runtime.types import Signature, VersionState

PLATFORM = {"model.pt2": "pytorch_export", "model.safetensors": "pytorch_safetensors",
            "model.pt": "pytorch_libtorch"}


def _signature(entry: ModelEntry, version: int | None) -> tuple[Signature | None, int | None]:
    """Signature of the given version, else of the newest AVAILABLE one, else declared."""
    if version is not None:
        h = entry.serving.get(version)
        if h is not None:
            return h.loaded.signature, version
    elif entry.serving:
        v = max(entry.serving)
        return entry.serving[v].loaded.signature, v
    return (entry.spec.declared_signature() if entry.spec else None), None


def _check_version(entry: ModelEntry, version: int | None) -> None:
    if version is None:
        return
    known = {s.version for s in entry.statuses()} | (set(entry.folder.versions) if entry.folder else set())
    if version not in known:
        raise errors.not_found(f"model '{entry.name}' has no version {version}")


def model_metadata(manager: Manager, model: str, version: int | None = None) -> dict:
    entry = manager.entry(model)
    _check_version(entry, version)
    sig, served = _signature(entry, version)
    h = entry.serving.get(served) if served is not None else None
    versions = [str(v) for v in entry.available_versions()]
    tensors = lambda specs: [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                             for s in specs]
    meta = {
        "name": model,
        "versions": versions,
        "platform": PLATFORM.get(h.loaded.format if h else "", "pytorch"),
        "inputs": tensors(sig.inputs) if sig else [],
        "outputs": tensors(sig.outputs) if sig else [],
    }
    if sig is not None and sig.derived:
        meta["parameters"] = {"signature": "derived from the model file; declare inputs and "
                                           "outputs in model.yaml to pin them"}
    return meta


def model_config(manager: Manager, model: str, version: int | None = None) -> dict:
    """Triton-style model configuration (what perf_analyzer and tritonclient ask for)."""
    entry = manager.entry(model)
    _check_version(entry, version)
    sig, served = _signature(entry, version)
    spec = entry.spec
    mbs = sig.max_batch_size if sig else (spec.max_batch_size if spec else 0)

    def dims(shape):  # Triton leaves the batch dim out when max_batch_size > 0
        return list(shape[1:]) if mbs > 0 and shape else list(shape)

    cfg = {
        "name": model,
        "platform": "pytorch_libtorch",
        "backend": "pytorch",
        "max_batch_size": mbs,
        "input": [{"name": s.name, "data_type": "TYPE_" + ("STRING" if s.datatype == "BYTES" else s.datatype),
                   "dims": dims(s.shape)} for s in (sig.inputs if sig else ())],
        "output": [{"name": s.name, "data_type": "TYPE_" + ("STRING" if s.datatype == "BYTES" else s.datatype),
                    "dims": dims(s.shape)} for s in (sig.outputs if sig else ())],
    }
    if spec is not None:
        pol = spec.version_policy
        cfg["version_policy"] = ({"all": {}} if pol == "all" else
                                 {"latest": {"num_versions": pol.latest}} if hasattr(pol, "latest")
                                 else {"specific": {"versions": pol.specific}})
        if spec.batching.enabled and mbs > 0:
            cfg["dynamic_batching"] = {
                "preferred_batch_size": spec.batching.preferred_batch_sizes,
                "max_queue_delay_microseconds": spec.batching.max_queue_delay_us,
            }
    return cfg


def repository_index(manager: Manager, ready_only: bool = False) -> list[dict]:
    out = []
    for name in sorted(set(manager.model_names()) | {p.name for p in list_models(manager.root)}):
        entry = manager.models.get(name)
        statuses = entry.statuses() if entry else []
        if not statuses:
            if not ready_only:
                out.append({"name": name, "version": "", "state": "UNAVAILABLE",
                            "reason": "unloaded" if entry and entry.disabled else "not loaded"})
            continue
        for st in statuses:
            ready = st.state is VersionState.AVAILABLE
            if ready_only and not ready:
                continue
            out.append({"name": name, "version": str(st.version),
                        "state": "READY" if ready else ("LOADING" if st.state in (VersionState.START, VersionState.LOADING)
                                                        else "UNAVAILABLE"),
                        "reason": st.error or ("" if ready else st.state.value.lower())})
    return out

