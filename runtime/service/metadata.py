"""Read-only views of models for every protocol: v2 metadata, Triton model config,
repository index and version status, as plain dicts (adapters encode them)."""

from __future__ import annotations

from pathlib import Path

from runtime import errors
from runtime.lifecycle.policy import policy_text, selected_by
from runtime.repository.scan import list_models
from runtime.types import Signature, VersionState
from runtime.views import ModelView, Snapshot

# One platform name everywhere (v2 metadata and the Triton config): what Triton's clients
# know for PyTorch models. The file format stays visible in the version's `format`.
PLATFORM = "pytorch_libtorch"


def _model(snapshot: Snapshot, model: str) -> ModelView:
    mv = snapshot.model(model)
    if mv is None:
        raise errors.not_found(f"unknown model '{model}'")
    return mv


def _signature(mv: ModelView, version: int | None) -> tuple[Signature | None, int | None]:
    """Signature of the given version, else of the newest AVAILABLE one, else declared."""
    if version is not None:
        sig, v = mv.signature(version)
        if sig is not None:
            return sig, v
        return mv.declared, None
    return mv.signature(None)


def _check_version(mv: ModelView, version: int | None) -> None:
    if version is not None and not mv.known(version):
        raise errors.not_found(f"model '{mv.name}' has no version {version}")


def model_metadata(snapshot: Snapshot, model: str, version: int | None = None) -> dict:
    mv = _model(snapshot, model)
    _check_version(mv, version)
    sig, _served = _signature(mv, version)
    versions = [str(v) for v in mv.available]
    tensors = lambda specs: [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                             for s in specs]
    meta = {
        "name": model,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": tensors(sig.inputs) if sig else [],
        "outputs": tensors(sig.outputs) if sig else [],
    }
    paths = {str(x.version): x.execution for x in mv.versions
             if x.state is VersionState.AVAILABLE and x.execution is not None}
    if paths:  # which path each version's forwards take: the same for all but batched ones
        meta["execution"] = paths
    if sig is not None and sig.derived:
        meta["parameters"] = {"signature": "derived from the model file; declare inputs and "
                                           "outputs in model.yaml to pin them"}
    if mv.spec_error is not None:
        meta.setdefault("parameters", {})["model_config_error"] = mv.config_error()
    return meta


def model_config(snapshot: Snapshot, model: str, version: int | None = None) -> dict:
    """Triton-style model configuration (what perf_analyzer and tritonclient ask for)."""
    mv = _model(snapshot, model)
    _check_version(mv, version)
    sig, _served = _signature(mv, version)
    mbs = sig.max_batch_size if sig else mv.max_batch_size

    def dims(shape):  # Triton leaves the batch dim out when max_batch_size > 0
        return list(shape[1:]) if mbs > 0 and shape else list(shape)

    cfg = {
        "name": model,
        "platform": PLATFORM,
        "backend": "pytorch",
        "max_batch_size": mbs,
        "input": [{"name": s.name, "data_type": "TYPE_" + ("STRING" if s.datatype == "BYTES" else s.datatype),
                   "dims": dims(s.shape)} for s in (sig.inputs if sig else ())],
        "output": [{"name": s.name, "data_type": "TYPE_" + ("STRING" if s.datatype == "BYTES" else s.datatype),
                    "dims": dims(s.shape)} for s in (sig.outputs if sig else ())],
    }
    pol = mv.version_policy
    if pol is not None:
        cfg["version_policy"] = ({"all": {}} if pol == "all" else
                                 {"latest": {"num_versions": pol.latest}} if hasattr(pol, "latest")
                                 else {"specific": {"versions": pol.specific}})
    if mv.batching is not None and mbs > 0:
        cfg["dynamic_batching"] = dict(mv.batching)
    return cfg


def repository_index(snapshot: Snapshot, root: Path, ready_only: bool = False) -> list[dict]:
    """Every model, and every version it has a status for or a folder of. A version on disk
    that is not loaded (never, after a restart, or no longer) is UNAVAILABLE "not loaded: why"."""
    out = []
    for name in sorted(set(snapshot.names()) | {p.name for p in list_models(root)}):
        mv = snapshot.model(name)
        statuses = {st.version: st for st in mv.versions} if mv else {}
        versions = sorted(set(statuses) | (mv.present if mv else set()))
        note = mv.config_error() if mv else None  # a bad model.yaml shows on every row
        if not versions:
            if not ready_only:
                out.append({"name": name, "version": "", "state": "UNAVAILABLE",
                            "reason": note or ("unloaded" if mv and mv.disabled else "not loaded")})
            continue
        for v in versions:
            st = statuses.get(v)
            ready = st is not None and st.state is VersionState.AVAILABLE
            if ready_only and not ready:
                continue
            if st is None or (st.state is VersionState.END and v in mv.present):
                out.append({"name": name, "version": str(v), "state": "UNAVAILABLE",
                            "reason": _not_loaded(mv, v)})
                continue
            out.append({"name": name, "version": str(v),
                        "state": "READY" if ready else ("LOADING" if st.state in (VersionState.START, VersionState.LOADING)
                                                        else "UNAVAILABLE"),
                        "reason": st.error or note or ("" if ready else st.state.value.lower())})
    return out


def _not_loaded(mv: ModelView, version: int) -> str:
    if mv.disabled:
        return "not loaded: unloaded through the repository API"
    if mv.version_policy is not None and version not in selected_by(mv.version_policy, mv.present):
        # said now, so a policy changed later to want it is known to fail before it does
        why = mv.unloadable.get(version)
        return (f"not loaded: not chosen by version policy {policy_text(mv.version_policy)}"
                + (f"; {why}" if why else ""))
    return "not loaded yet"
