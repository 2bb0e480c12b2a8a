"""Triton's statistics extension (`GET /v2/models[/{m}[/versions/{v}]]/stats`, gRPC
ModelStatistics) read from a Store: per-version success, failure, queue and compute
durations, executions by batch size, memory."""

from __future__ import annotations

from runtime import errors
from runtime.metrics.merge import reading
from runtime.metrics.store import Store


def statistics(store: Store, model: str | None = None, version: int | str | None = None) -> dict:
    """`{"model_stats": [...]}` in the shape of Triton's statistics extension.

    model None or "": every model. version None or "": every version of the model.
    Unknown model or version: NOT_FOUND. Shadow requests count too (they ran on the
    version); compute_input/compute_output are folded into compute_infer (ns 0).
    """
    src = reading(store)
    if isinstance(version, str):
        if version == "":
            version = None
        elif not (version.isascii() and version.isdigit()):
            raise errors.invalid(f"version must be a positive integer, got {version!r}")
        else:
            version = int(version)
    if not model:
        if version is not None:
            raise errors.invalid("a version needs a model name")
        return {"model_stats": [_model_stat(src, m, v) for m in src.model_names()
                                for v in _versions_of(src, m)]}
    if not src.model_known(model):
        raise errors.not_found(f"unknown model '{model}'")
    versions = _versions_of(src, model)
    if version is not None:
        if version not in versions:
            raise errors.not_found(f"model '{model}' has no statistics for version {version} "
                                   f"(known: {', '.join(map(str, versions)) or 'none'})")
        versions = [version]
    return {"model_stats": [_model_stat(src, model, v) for v in versions]}


def _versions_of(src: Store, model: str) -> list[int]:
    vs = set(src.statuses(model))
    vs.update(v for (m, v) in src.by_version if m == model)
    return sorted(vs)


def _model_stat(src: Store, model: str, version: int) -> dict:
    series = src.by_version.get((model, version), [])
    n = sum(s.n for s in series)
    ex = src.executions(model, version)
    batch_stats = []
    n_exec = c_ns = 0
    for size in sorted(ex):
        cnt, comp = ex[size]
        n_exec += cnt
        c_ns += int(comp * 1e9)
        batch_stats.append({"batch_size": size,
                            "compute_input": {"count": cnt, "ns": 0},
                            "compute_infer": {"count": cnt, "ns": int(comp * 1e9)},
                            "compute_output": {"count": cnt, "ns": 0}})

    def dur(count, secs):
        return {"count": int(count), "ns": int(secs * 1e9)}

    memory = []
    vv = src.statuses(model).get(version)
    if vv is not None and vv.device is not None and vv.memory_bytes:
        dev, _, idx = vv.device.partition(":")
        memory.append({"type": "GPU" if dev == "cuda" else "CPU",
                       "id": int(idx) if idx.isdigit() else 0,
                       "byte_size": int(vv.memory_bytes)})
    return {
        "name": model,
        "version": str(version),
        "last_inference": src.last_epoch_ms(series),
        "inference_count": sum(s.inf for s in series),
        "execution_count": n_exec,
        "inference_stats": {
            "success": dur(n, sum(s.ok_sum for s in series)),
            "fail": dur(sum(s.err for s in series), sum(s.err_sum for s in series)),
            "queue": dur(n, sum(s.q_sum for s in series)),
            "compute_input": dur(n_exec, 0.0),
            "compute_infer": {"count": n_exec, "ns": c_ns},
            "compute_output": dur(n_exec, 0.0),
            "cache_hit": dur(0, 0.0),
            "cache_miss": dur(0, 0.0),
        },
        "batch_stats": batch_stats,
        "memory_usage": memory,
    }
