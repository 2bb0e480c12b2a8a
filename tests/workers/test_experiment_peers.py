"""runtime/decider/workers.py on real files, sockets and locks: one lock holder at a time
(released when it closes), decision records read once each across segment rotation and
half-written lines (with the share and the sticky key they were routed by, keys with tabs
and newlines intact), tally files of the others only, and a forwarded call answered."""

from __future__ import annotations

import asyncio
import os

import pytest

from runtime.decider import tally
from runtime.decider import workers as experiment_peers
from runtime.decider.workers import Peers, Unanswered


def test_one_lock_holder_and_the_lock_passes_on_close(tmp_path):
    a, b = Peers(tmp_path, 0), Peers(tmp_path, 1)
    assert a.try_lead() and not b.try_lead() and a.try_lead()
    asyncio.run(a.close())
    assert b.try_lead()
    asyncio.run(b.close())


def test_records_cross_segments_once_each_and_half_lines_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment_peers, "SEGMENT", 3)
    w, r = Peers(tmp_path, 0), Peers(tmp_path, 1)
    for i in range(4):
        w.append_record(f"id-{i}", "mlp", 1 + i % 2, "control" if i % 2 == 0 else None)
    w.append_record("bad\tid", "mlp", 1, None)  # never joinable: not written
    assert list(r.new_records()) == [("id-0", "mlp", 1, "control", None, None), ("id-1", "mlp", 2, None, None, None),
                                     ("id-2", "mlp", 1, "control", None, None), ("id-3", "mlp", 2, None, None, None)]
    with open(tmp_path / f"d0-{os.getpid()}-1.log", "ab") as f:
        f.write(b"id-4\tmlp\t1\tcandi")  # a writer mid-line
    assert list(r.new_records()) == []
    with open(tmp_path / f"d0-{os.getpid()}-1.log", "ab") as f:
        f.write(b"date\n")
    assert list(r.new_records()) == [("id-4", "mlp", 1, "candidate", None, None)]  # a line before issue 29
    got = []
    for i in range(5, 12):  # a reader less than a segment behind misses nothing
        w.append_record(f"id-{i}", "mlp", 1, None)
        if i % 2:
            got += [x[0] for x in r.new_records()]
    assert got == [f"id-{i}" for i in range(5, 12)]
    assert len(list(tmp_path.glob("d0-*.log"))) == 2  # older segments deleted: bounded disk
    assert list(w.new_records()) == []  # a worker never reads its own records
    for key in ("user\t1\n", "-", "=x", "back\\slash"):
        w.append_record(f"k-{key!r}", "mlp", 2, "candidate", 0.25, key)
    assert [(x[4], x[5]) for x in r.new_records()] == [(0.25, k) for k in ("user\t1\n", "-", "=x", "back\\slash")]
    t = tally.Tally(w.tally_path("a"))
    t.add(t.slot("a\tmlp\t1\t0.5", 2), 1, 3)
    assert r.peer_tallies("a") == [{"a\tmlp\t1\t0.5": [0.0, 3.0]}] and w.peer_tallies("a") == []
    t.close()
    for p in (w, r):
        asyncio.run(p.close())


def test_a_forwarded_call_is_answered_and_no_listener_is_an_oserror(tmp_path):
    async def go():
        lead, other = Peers(tmp_path, 0), Peers(tmp_path, 1)
        with pytest.raises(OSError):
            await other.forward({"op": "x"})  # nothing listens: safe to retry
        assert lead.try_lead()

        async def handle(call):
            return {"ok": {"echo": call}}
        await lead.serve(handle)
        assert await other.forward({"op": "feedback", "body": {"items": []}}) == \
            {"ok": {"echo": {"op": "feedback", "body": {"items": []}}}}

        async def silent(call):
            raise ValueError("no answer")
        await lead.close()
        lead = Peers(tmp_path, 0)
        assert lead.try_lead()
        await lead.serve(silent)
        with pytest.raises(Unanswered):
            await other.forward({"op": "action"})
        await lead.close()
        await other.close()
    asyncio.run(go())
