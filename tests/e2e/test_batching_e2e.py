"""Dynamic batching on a live server: concurrent requests share forward passes and get
exactly the answers they get alone; a release under batched load drops nothing."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import torch

from conftest import MLP_YAML, expected_output, wait_until

BATCHING_YAML = MLP_YAML.replace(
    "batching:\n  enabled: false", "batching:\n  enabled: true\n  exact: true").replace(
    "max_queue_delay_us: 500", "max_queue_delay_us: 20000")
assert "enabled: true" in BATCHING_YAML and "max_queue_delay_us: 20000" in BATCHING_YAML


def _body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}


def _out(r: httpx.Response, n: int) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(n, 8)


async def _concurrently(url: str, xs: list[np.ndarray]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as c:
        return await asyncio.gather(*(c.post(url, json=_body(x)) for x in xs))


def _batcher(srv, version: int):
    return srv.on_loop(lambda: srv.core.manager.models["mlp"].serving[version].runner.batcher)


def test_concurrent_requests_batched_and_bit_identical_to_alone(make_repo, serve):
    srv = serve(make_repo({"mlp": {1: "st1"}}, yaml={"mlp": BATCHING_YAML}))
    assert srv.available("mlp") == [1]
    b = _batcher(srv, 1)
    assert b is not None and b.max_batch_size == 64
    url = f"{srv.http}/v2/models/mlp/infer"
    rng = np.random.default_rng(0)
    sizes = [1, 2, 3, 1, 4, 1, 5, 2, 1, 1, 3, 1, 2, 1, 1, 6]
    xs = [rng.standard_normal((n, 64)).astype(np.float32) for n in sizes]

    together = [_out(r, x.shape[0]) for r, x in zip(asyncio.run(_concurrently(url, xs)), xs)]
    stats = srv.on_loop(lambda: b.stats.as_dict())
    assert max(stats["sizes"]) > 1, stats  # requests really shared forward passes
    assert stats["batches"] < len(xs)

    with httpx.Client(timeout=30) as c:  # the same requests, each alone in its batch
        alone = [_out(c.post(url, json=_body(x)), x.shape[0]) for x in xs]
    for x, t, a in zip(xs, together, alone):
        assert np.array_equal(t, a), "a batched answer differs from the same request alone"
        np.testing.assert_allclose(t, expected_output(1, torch.from_numpy(x)).numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_batch_over_max_is_rejected_and_queue_reports_version(make_repo, serve):
    srv = serve(make_repo({"mlp": {1: "st1"}}, yaml={"mlp": BATCHING_YAML}))
    x = np.zeros((65, 64), dtype=np.float32)
    r = httpx.post(f"{srv.http}/v2/models/mlp/infer", json=_body(x))
    assert r.status_code == 400 and "max_batch_size 64" in r.json()["error"]


def test_release_under_batched_load_drains_queue_without_errors(make_repo, serve,
                                                                 version_cache):
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": BATCHING_YAML})
    srv = serve(repo)
    old = _batcher(srv, 1)
    url = f"{srv.http}/v2/models/mlp/infer"
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    codes: list[int] = []
    versions: set[str] = set()

    async def load(stop: asyncio.Event):
        async with httpx.AsyncClient(timeout=30) as c:
            async def worker():
                while not stop.is_set():
                    r = await c.post(url, json=_body(x))
                    codes.append(r.status_code)
                    versions.add(r.headers.get("x-model-version", "?"))
            await asyncio.gather(*(worker() for _ in range(8)))

    async def main():
        stop = asyncio.Event()
        task = asyncio.ensure_future(load(stop))
        await asyncio.to_thread(wait_until, lambda: len(codes) > 20, 30)
        tmp = repo / "mlp" / ".2.tmp"
        shutil.copytree(version_cache / "st2", tmp)
        tmp.rename(repo / "mlp" / "2")  # publish by rename
        ok = await asyncio.to_thread(
            wait_until, lambda: srv.available("mlp") == [2] and "2" in versions, 60)
        n = len(codes)
        await asyncio.to_thread(wait_until, lambda: len(codes) > n + 20, 30)
        stop.set()
        await task
        return ok

    assert asyncio.run(main()), srv.available("mlp")
    assert set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert versions == {"1", "2"}
    assert old._closed and old.queued == 0 and old._task.done()
    assert _batcher(srv, 2) is not old
