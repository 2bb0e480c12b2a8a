"""splitserve.Client and AsyncClient against a real server on loopback (port 0): routed,
pinned, labelled and sticky predictions with the right numbers; numpy and torch in; typed
errors with the server's one line; routing, experiment actions and feedback; the README's
client example run as written; `splitserve --version` and `python -m splitserve`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import splitserve
from conftest import expected_output, wait_until
from ship_helpers import serve_routed

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "client-token"
X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
ROUTING = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 90, "canary": 10},
           "sticky": {"header": "x-user-id"}}


@pytest.fixture
def srv(make_repo, serve, tmp_path):
    return serve_routed(make_repo, serve, tmp_path, ROUTING, TOKEN)


def close(a, seed: int) -> bool:
    return np.allclose(a, expected_output(seed, torch.from_numpy(X)).numpy(), atol=1e-5)


def test_predict_routes_pins_labels_and_sticks(srv):
    c = splitserve.Client(srv.http)
    r = c.predict("mlp", {"input": X})
    assert r.version in (1, 2) and r.route == "split" and r.request_id
    assert r.outputs["output"].shape == (1, 8) and r.outputs["output"].dtype == np.float32
    assert close(r["output"], r.version)  # the numbers of the version that says it served

    pinned = c.predict("mlp", {"input": X}, version=1)
    assert (pinned.version, pinned.route) == (1, "pinned") and close(pinned["output"], 1)
    by_label = c.predict("mlp", {"input": X}, label="canary")
    assert (by_label.version, by_label.route) == (2, "label") and close(by_label["output"], 2)

    for user in ("alice", "bob", "carol"):
        got = {(c.predict("mlp", {"input": X}, key=user).version) for _ in range(4)}
        assert len(got) == 1, f"{user} moved between versions: {got}"
    assert c.predict("mlp", {"input": X}, key="alice").route == "sticky"

    # a torch tensor in, torch tensors back; only the named output when asked
    t = c.predict("mlp", {"input": torch.from_numpy(X)}, version=2, outputs=["output"])
    assert close(t["output"], 2) and isinstance(t.torch()["output"], torch.Tensor)


def test_errors_are_typed_with_the_servers_one_line(srv):
    c = splitserve.Client(srv.http)
    with pytest.raises(splitserve.NotFound) as e:
        c.predict("nope", {"input": X})
    assert e.value.status == 404 and str(e.value) == "unknown model 'nope'" and e.value.request_id
    with pytest.raises(splitserve.InvalidArgument) as e:
        c.predict("mlp", {"input": X[:, :10]})
    assert "\n" not in str(e.value) and "input" in str(e.value) and e.value.status == 400
    with pytest.raises(splitserve.NotFound, match="label"):
        c.predict("mlp", {"input": X}, label="nightly")
    with pytest.raises(splitserve.Unauthenticated):
        c.put_routing("mlp", ROUTING)  # no token
    with pytest.raises(splitserve.InvalidArgument, match="weights"):
        splitserve.Client(srv.http, token=TOKEN).put_routing("mlp", {**ROUTING, "weights": {"gold": 1}})
    with pytest.raises(ValueError, match="not both"):
        c.predict("mlp", {"input": X}, version=1, label="canary")
    with pytest.raises(ValueError, match="server URL"):
        splitserve.Client("127.0.0.1:8000")
    closed = splitserve.Client("http://127.0.0.1:9", timeout=5)  # discard port: nothing listens
    with pytest.raises(splitserve.ConnectionFailed):
        closed.routing("mlp")
    assert not closed.ready() and c.ready()
    # a key for a model whose routing has no sticky: said, not silently ignored
    admin = splitserve.Client(srv.http, token=TOKEN)
    admin.put_routing("mlp", {k: v for k, v in ROUTING.items() if k != "sticky"})
    with pytest.raises(ValueError, match="no sticky routing"):
        admin.predict("mlp", {"input": X}, key="alice")


def test_routing_experiment_actions_and_feedback(srv):
    c = splitserve.Client(srv.http, token=TOKEN)
    assert c.routing("mlp")["labels"] == {"stable": 1, "canary": 2}
    exp = {"control": "stable", "candidate": "canary", "steps": [50, 100], "interval_s": 0.3,
           "min_requests": 10_000, "min_duration_s": 0,
           "outcomes": [{"metric": "click", "kind": "binary", "goal": "increase"}]}
    c.put_routing("mlp", {**ROUTING, "weights": {"stable": 100}, "experiment": exp})
    assert wait_until(lambda: c.experiment("mlp")["decisions"][:1], 30)
    served = c.predict("mlp", {"input": X}, key="dave")
    got = {}
    assert wait_until(lambda: got.update(c.feedback("mlp", [{"request_id": served.request_id,
                                                              "metric": "click", "value": 1}]))
                      or got.get("matched") == 1 or got.get("duplicate") == 1, 30), got
    assert c.feedback("mlp", [{"request_id": served.request_id, "metric": "click",
                               "value": 1}])["duplicate"] == 1
    assert c.pause("mlp")["state"] == "paused"
    assert c.resume("mlp")["state"] != "paused"
    with pytest.raises(splitserve.NotFound, match="unknown experiment action"):
        c.experiment_action("mlp", "explode")


def test_async_client(srv):
    async def main():
        async with splitserve.AsyncClient(srv.http) as c:
            results = await asyncio.gather(*(c.predict("mlp", {"input": X}, version=v) for v in (1, 2)))
            routing = await c.routing("mlp")
            with pytest.raises(splitserve.NotFound):
                await c.routing("nope")
            return results, routing

    (r1, r2), routing = asyncio.run(main())
    assert (r1.version, r2.version) == (1, 2) and close(r2["output"], 2)
    assert routing["weights"] == ROUTING["weights"]


def test_the_readme_client_example_runs_as_written(srv):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- client-example[^>]*-->\n```python\n(.*?)```", readme, re.S).group(1)
    assert 'splitserve.Client("http://127.0.0.1:8000")' in block
    code = block.replace("http://127.0.0.1:8000", srv.http)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"[12] sticky \S+ \(1, 8\)", lines[0]), lines
    assert lines[1:4] == ["2", "2", "{'stable': 90, 'canary': 10}"], lines
    assert lines[4].startswith("400 input 'input'"), lines


def test_version_is_one_string_everywhere():
    from runtime import __version__
    assert splitserve.__version__ == __version__
    for cmd in ([sys.executable, "-m", "splitserve", "--version"],
                [sys.executable, "-m", "runtime", "--version"]):
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == f"splitserve {__version__}", out
