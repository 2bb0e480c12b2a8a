"""In-process cost of tracing on the data path: `InferenceService.infer` on the bundled
small model (batch 1, the inline CPU path), tracing off vs on at 1% vs on at 100%.

    python bench/bench_tracing.py [--requests N] [--rounds R]

One Core serves the repository; the variants swap `core.inference.tracing` (None, or a
Tracing made by `runtime.tracing.from_env` with an OTLP/HTTP exporter to a receiver on
loopback, tools/otlp_receiver.py), interleaved round by round, so machine noise falls on
all alike. Without HTTP or gRPC around it the difference per request is what tracing
adds to the server's own work (the export runs on the SDK's thread and is flushed inside
each timed round, so it is counted where it was made; the receiver is another process). Prints
date, machine, commit and a markdown table: median µs per request over the rounds and
the difference to `off`, in wall time and in this process's CPU time (all its threads,
the SDK's export thread included; not the receiver's, nor other load on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def _tracing(endpoint: str, ratio: float):
    from runtime import tracing
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
           "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the SDK reads its own variables
    try:
        return tracing.from_env()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def run(o) -> tuple[dict, int]:
    import numpy as np

    from runtime.config.settings import Settings
    from runtime.service.core import Core
    from runtime.types import InferRequest, Tensor

    # the receiver runs in its own process: decoding what it is sent is not the server's work
    rec = subprocess.Popen([sys.executable, str(ROOT / "tools" / "otlp_receiver.py")],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(rec.stdout.readline())
    s = Settings()
    s.repository.path = ROOT / "model_repository"
    with tempfile.TemporaryDirectory() as t:
        cfg = Path(t) / "empty.yaml"
        cfg.write_text("{}\n")
        s.config_path = cfg
        core = Core(s)
        await core.start()
        x = np.full((1, 64), 0.1, dtype=np.float32)
        variants = {"off": None, "on 1%": _tracing(f"http://127.0.0.1:{port}", 0.01),
                    "on 100%": _tracing(f"http://127.0.0.1:{port}", 1.0)}
        infer = core.inference.infer
        out: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for rnd in range(o.rounds + 1):  # round 0 warms up
            order = list(variants.items())
            for name, tr in (order if rnd % 2 else order[::-1]):
                core.inference.tracing = tr
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(o.requests):
                    await infer(InferRequest("mlp", [Tensor("input", "FP32", (1, 64), x)],
                                             protocol="rest_v2"))
                if tr is not None:  # its export is its cost, not the next variant's
                    await asyncio.to_thread(tr.provider.force_flush)
                if rnd:
                    out[name].append(((time.perf_counter() - t0) / o.requests * 1e6,
                                      (time.process_time() - c0) / o.requests * 1e6))
        for tr in variants.values():
            if tr is not None:
                tr.shutdown()
        core.inference.tracing = None
        await core.stop()
    spans = int(rec.communicate("", timeout=60)[0].strip() or 0)
    return out, spans


def per_call() -> dict[str, float]:
    """µs per call of what a request the sampler drops pays (best of 5 timeit runs)."""
    import timeit
    tr = _tracing("http://127.0.0.1:9", 0.0)  # never sampled: nothing is exported
    hdr = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
    n = 20000
    out = {
        "off: `tracing is None`": min(timeit.repeat(lambda: tr is None, number=n, repeat=5)) / n * 1e6,
        "on, dropped, no traceparent": min(timeit.repeat(lambda: tr.begin("rest_v2", "mlp", {}),
                                                         number=n, repeat=5)) / n * 1e6,
        "on, dropped, caller's traceparent": min(timeit.repeat(lambda: tr.begin("rest_v2", "mlp", hdr),
                                                                number=n, repeat=5)) / n * 1e6,
    }
    tr.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=7)
    o = ap.parse_args()
    out, spans = asyncio.run(run(o))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.node()} "
          f"({os.cpu_count()} CPUs); commit {commit}; {o.rounds} rounds of {o.requests} requests; "
          f"load average {' '.join(load)}; spans received {spans}\n")
    base = [statistics.median(r[i] for r in out["off"]) for i in (0, 1)]
    print("| tracing | wall µs per request | vs off | CPU µs per request (this process) | vs off |\n"
          "|---|---:|---:|---:|---:|")
    for name, v in out.items():
        w, c = (statistics.median(r[i] for r in v) for i in (0, 1))
        print(f"| {name} | {w:.1f} | {w - base[0]:+.1f} | {c:.1f} | {c - base[1]:+.1f} |")
    print("\n| per call | µs |\n|---|---:|")
    for name, us in per_call().items():
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
