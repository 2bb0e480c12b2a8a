"""Routing config on a ConfigMap volume: kubelet's `..data` swaps apply (three in a row),
the read-only source refuses routing changes with 409 / FAILED_PRECONDITION and changes
nothing, an unchanged hash reloads nothing, and the hash poll heals a missed event."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import grpc
import httpx
import pytest

from conftest import wait_until
from kubelet import ConfigMapVolume
from runtime.routing.file_source import FileSource
from runtime.protocol.pb import splitserve_management_pb2 as mpb
from runtime.protocol.pb import splitserve_management_pb2_grpc as mpb_grpc

DOC = "models:\n  mlp:\n    labels: {{stable: 1, canary: 2}}\n    weights: {{stable: {a}, canary: {b}}}\n"


def routing(srv) -> dict:
    r = httpx.get(f"{srv.http}/v1/models/mlp/routing", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def mounted(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    vol = ConfigMapVolume(tmp_path / "etc-splitserve")
    vol.write({"splitserve.yaml": DOC.format(a=100, b=0)})
    srv = serve(repo, config=vol.mount / "splitserve.yaml", quiet_s=0.2)
    assert srv.available("mlp") == [1, 2]
    assert routing(srv)["weights"] == {"stable": 100, "canary": 0}
    return srv, vol


def test_three_configmap_updates_in_a_row_each_apply(mounted):
    srv, vol = mounted
    took = []
    for a, b in [(0, 100), (50, 50), (30, 70)]:
        t0 = time.monotonic()
        old = Path(os.readlink(vol.mount / "..data"))
        vol.write({"splitserve.yaml": DOC.format(a=a, b=b)})
        assert not (vol.mount / old).exists()  # the folder the file resolved to is deleted
        assert wait_until(lambda: routing(srv)["weights"] == {"stable": a, "canary": b}, 10), \
            f"update {vol.updates} not applied: {routing(srv)}"
        took.append(time.monotonic() - t0)
    print(f"configmap swaps applied in {', '.join(f'{t * 1000:.0f} ms' for t in took)}")
    assert vol.updates == 4


def test_read_only_source_refuses_put_and_set_routing(mounted):
    srv, vol = mounted
    cfg = vol.mount / "splitserve.yaml"
    before_bytes, before = cfg.read_bytes(), routing(srv)
    r = httpx.put(f"{srv.http}/v1/models/mlp/routing", timeout=10,
                  json={"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 1, "canary": 1}})
    assert r.status_code == 409, r.text
    msg = r.json()["error"]
    assert "routing is managed by a ConfigMap volume" in msg and "change it there" in msg, msg
    assert str(cfg) in msg and "\n" not in msg
    with grpc.insecure_channel(srv.grpc) as ch:
        stub = mpb_grpc.RoutingServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.SetRouting(mpb.SetRoutingRequest(model="mlp", config_json=json.dumps(
                {"weights": {"1": 1}})), timeout=10)
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION, e.value
    assert "change it there" in e.value.details()
    assert routing(srv) == before and cfg.read_bytes() == before_bytes
    # The ConfigMap itself is still the way to change it.
    vol.write({"splitserve.yaml": DOC.format(a=1, b=3)})
    assert wait_until(lambda: routing(srv)["weights"] == {"stable": 1, "canary": 3}, 10)


def test_put_still_persists_to_a_writable_file(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "conf" / "splitserve.yaml"
    cfg.parent.mkdir()
    cfg.write_text(DOC.format(a=100, b=0))
    srv = serve(repo, config=cfg, quiet_s=0.2)
    r = httpx.put(f"{srv.http}/v1/models/mlp/routing", timeout=10,
                  json={"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 2, "canary": 5}})
    assert r.status_code == 200, r.text
    assert "canary: 5" in cfg.read_text()


def _run_source(tmp_path: Path, body):
    """Run a FileSource on a fresh loop; body(source, seen, loop) drives it."""
    async def main():
        loop = asyncio.get_running_loop()
        seen: list[str | None] = []
        src = FileSource(tmp_path / "conf" / "splitserve.yaml", poll_s=0.3, quiet_s=0.05)
        src.read()
        src.start(loop, seen.append)
        try:
            await body(src, seen, loop)
        finally:
            src.stop()
    asyncio.run(main())


async def _until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        await asyncio.sleep(0.02)
    return pred()


def test_same_content_reloads_nothing_new_content_once(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "splitserve.yaml").write_text(DOC.format(a=1, b=1))

    async def body(src, seen, loop):
        (conf / "splitserve.yaml").write_text(DOC.format(a=1, b=1))  # same bytes: an event, no news
        (conf / "unrelated.txt").write_text("x")
        assert src.check() is False
        (conf / "splitserve.yaml").write_text(DOC.format(a=2, b=1))
        assert await _until(lambda: len(seen) == 1)
        assert seen == [DOC.format(a=2, b=1)]
        # a few more poll periods change nothing
        t_end = time.monotonic() + 1.0
        await _until(lambda: time.monotonic() > t_end or len(seen) > 1, 2)
        assert len(seen) == 1

    _run_source(tmp_path, body)


def test_hash_poll_heals_a_missed_event(tmp_path):
    """The watched folder is swapped for another (its watch stays on the old inode, so no
    event arrives): only the poll can see the new content."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "splitserve.yaml").write_text(DOC.format(a=1, b=1))

    async def body(src, seen, loop):
        fresh = tmp_path / "conf.new"
        fresh.mkdir()
        (fresh / "splitserve.yaml").write_text(DOC.format(a=9, b=1))
        os.rename(conf, tmp_path / "conf.old")
        os.rename(fresh, conf)
        assert await _until(lambda: seen == [DOC.format(a=9, b=1)], 5), seen

    _run_source(tmp_path, body)


def test_a_folder_that_is_never_still_does_not_hold_a_change_back(tmp_path):
    """A log written beside the config every 20 ms keeps the folder busy for longer than
    the quiet time: the change is still applied (the poll is an hour away here)."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "splitserve.yaml").write_text(DOC.format(a=1, b=1))

    async def main():
        loop = asyncio.get_running_loop()
        seen: list[str | None] = []
        src = FileSource(conf / "splitserve.yaml", poll_s=3600, quiet_s=0.2)
        src.read()
        src.start(loop, seen.append)
        writes = 0

        async def chatter():
            nonlocal writes
            while True:
                with open(conf / "server.log", "a") as f:
                    f.write(f"line {writes}\n")
                writes += 1
                await asyncio.sleep(0.02)

        task = asyncio.create_task(chatter())
        try:
            assert await _until(lambda: writes >= 5)
            (conf / "splitserve.yaml").write_text(DOC.format(a=2, b=1))
            at = writes
            assert await _until(lambda: seen == [DOC.format(a=2, b=1)], 10), seen
            assert not task.done() and writes > at  # the folder was busy all along
        finally:
            task.cancel()
            src.stop()

    asyncio.run(main())


def test_writable_knows_the_configmap_layout(tmp_path):
    vol = ConfigMapVolume(tmp_path / "cm")
    vol.write({"splitserve.yaml": "models: {}\n"})
    assert not FileSource(vol.mount / "splitserve.yaml").writable
    plain = tmp_path / "plain.yaml"
    plain.write_text("models: {}\n")
    assert FileSource(plain).writable


def test_a_document_naming_an_unseen_version_applies_once_it_is_here(make_repo, serve, tmp_path, version_cache):
    """Across replicas a PUT may name a version another replica has not scanned yet: there
    the document is rejected at first and applied once that version is AVAILABLE."""
    import shutil

    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    vol = ConfigMapVolume(tmp_path / "etc-splitserve")
    vol.write({"splitserve.yaml": DOC.format(a=100, b=0)})
    srv = serve(repo, config=vol.mount / "splitserve.yaml", quiet_s=0.2)
    vol.write({"splitserve.yaml": DOC.format(a=1, b=1).replace("canary: 2}", "canary: 3}")})
    assert wait_until(lambda: srv.core.control._rejected_text is not None, 10)
    assert routing(srv)["weights"] == {"stable": 100, "canary": 0}
    shutil.copytree(version_cache / "st3", repo / "mlp" / ".3.tmp")
    os.rename(repo / "mlp" / ".3.tmp", repo / "mlp" / "3")
    assert wait_until(lambda: routing(srv)["labels"] == {"stable": 1, "canary": 3}, 30), routing(srv)
    assert routing(srv)["weights"] == {"stable": 1, "canary": 1}
