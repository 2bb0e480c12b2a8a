"""bench/loadgen.py's gRPC client over raw HTTP/2 frames (the default) against a live
server: every answer it counts is a real ModelInfer answer (the server's statistics agree),
and gRPC errors count as errors, not as answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LOADGEN = Path(__file__).resolve().parents[2] / "bench" / "loadgen.py"


def _loadgen(target: str, model: str, *extra: str) -> dict:
    cmd = [sys.executable, str(LOADGEN), "grpc", "--target", target, "--model", model,
           "--input", "input:FP32:1x64", "-c", "4", "--channels", "2", "--duration", "1",
           "--warmup", "0.2", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _served(srv) -> int:
    stats = srv.core.metrics.statistics("mlp", None)
    return sum(int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"])


@pytest.mark.parametrize("client", ["raw", "grpcio"])
def test_loadgen_grpc_counts_real_answers(make_repo, serve, client):
    srv = serve(make_repo({"mlp": {1: "st1", 2: "st2"}}))
    r = _loadgen(srv.grpc, "mlp", "--client", client)
    assert r["errors"] == 0 and r["requests"] > 0
    assert set(r["versions"]) == {"2"} and r["versions"]["2"] == r["requests"]
    # the window counts only requests started inside it; the server saw those and more
    assert _served(srv) >= r["requests"]


def test_loadgen_grpc_errors_are_errors(make_repo, serve):
    srv = serve(make_repo({"mlp": {1: "st1"}}))
    r = _loadgen(srv.grpc, "nope")  # NOT_FOUND: a trailers-only answer, no message
    assert r["requests"] == 0 and r["errors"] > 0 and r["error_kinds"] == {"grpc error": r["errors"]}
