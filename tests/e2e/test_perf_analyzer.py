"""Triton's perf_analyzer drives a live splitserve over gRPC (unary and streaming) and
HTTP, unchanged. Needs the binary: `bash bench/get_perf_analyzer.sh`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

PERF_ANALYZER = Path(__file__).resolve().parents[2] / "bench" / ".tools" / "perf_analyzer"

pytestmark = [
    pytest.mark.perf_analyzer,
    pytest.mark.skipif(not PERF_ANALYZER.exists(),
                       reason="perf_analyzer missing: run `bash bench/get_perf_analyzer.sh`"),
]


def _run(url: str, protocol: str, *extra: str) -> str:
    cmd = [str(PERF_ANALYZER), "-m", "mlp", "-u", url, "-i", protocol, "-b", "1",
           "--measurement-interval", "1000", "--concurrency-range", "1:2",
           # a functional check on a small shared machine, not a benchmark: accept noisy windows
           "--stability-percentage", "100", "--max-trials", "10", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{out}"
    assert not re.search(r"(?i)\berror\b|failed|abort", out), out
    rates = [float(r) for r in re.findall(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", out)]
    assert len(rates) == 2 and all(r > 0 for r in rates), out
    return out


@pytest.fixture
def srv(make_repo, serve):
    return serve(make_repo({"mlp": {1: "st1", 2: "st2"}}))


@pytest.mark.parametrize("protocol,extra", [("grpc", ()), ("grpc", ("--streaming",)),
                                            ("http", ())], ids=["grpc", "grpc-stream", "http"])
def test_perf_analyzer(srv, protocol, extra):
    url = srv.grpc if protocol == "grpc" else srv.http.removeprefix("http://")
    out = _run(url, protocol, *extra)
    print(out)
