"""`--workers 2` vs `--workers 1`: the bundled small model over REST and gRPC at fixed
concurrency, with bench/loadgen.py as the client (perf_analyzer may be absent here).

    python bench/workers.py --workers 1 2 --concurrency 32 --duration 10 [--append]

Each worker count gets a fresh `splitserve serve` (its own supervisor when N > 1) on free
ports; the client shares the machine, so on a 2-core VM the figures are a floor. With
--append, a section (date, machine, commit, torch) goes to --results (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from serverproc import ServerProcess  # noqa: E402  (tools/)

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.1] * 64}]}


def serve(workers: int, tmp: Path):
    """`splitserve serve --workers N` (tools/serverproc.py), once every worker serves."""
    cfg = tmp / "empty.yaml"
    cfg.write_text("{}\n")
    p = ServerProcess(ROOT / "model_repository", "--workers", str(workers), "--access-log", "off",
                      config=cfg, cwd=ROOT).wait_serving(300)
    return p, {"http": p.http_hostport, "grpc": p.grpc_target}


def load(kind: str, addr: str, c: int, duration: float, tmp: Path, channels: int = 8,
         client: str = "raw") -> dict:
    body = tmp / "body.json"
    body.write_text(json.dumps(BODY))
    if kind == "rest":
        args = ["http", "--url", f"http://{addr}/v2/models/mlp/infer", "--body", str(body)]
    else:
        # One gRPC connection lands on one worker: open one per worker and more.
        args = ["grpc", "--target", addr, "--model", "mlp", "--input", "input:FP32:1x64",
                "--channels", str(channels), "--client", client]
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), *args,
                          "--concurrency", str(c), "--duration", str(duration), "--warmup", "2"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--channels", type=int, default=8,
                    help="gRPC connections of the client (one lands on one worker)")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for n in a.workers:
            p, addr = serve(n, tmp)
            try:
                for kind in ("rest", "grpc"):
                    r = load(kind, addr["http"] if kind == "rest" else addr["grpc"],
                             a.concurrency, a.duration, tmp, a.channels)
                    row = {"workers": n, "protocol": kind, "c": a.concurrency,
                           "infer_per_s": r.get("throughput"), "p50_ms": r.get("p50_ms"),
                           "p99_ms": r.get("p99_ms"), "errors": r.get("errors")}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                p.stop(120)
    if a.append:
        import torch
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        base = {(r["protocol"]): r["infer_per_s"] for r in rows if r["workers"] == a.workers[0]}
        lines = [f"\n## --workers ({time.strftime('%Y-%m-%d')}, {platform.node()}, "
                 f"{os.cpu_count()} cores, commit {commit}, torch {torch.__version__})",
                 f"Small model (mlp), c={a.concurrency}, {a.duration:g} s, client bench/loadgen.py "
                 f"on the same machine (gRPC: {a.channels} connections).", "",
                 "| workers | protocol | infer/s | p50 ms | p99 ms | errors | vs first |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            ratio = (r["infer_per_s"] or 0) / (base.get(r["protocol"]) or 1)
            lines.append(f"| {r['workers']} | {r['protocol']} | {r['infer_per_s']:.0f} | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {ratio:.2f}x |")
        with open(a.results, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
