"""Per-call cost of Metrics.record_request (the hot path) and of the readers.

    python bench/bench_metrics.py [--calls N] [--repeat R]

Prints date, machine, commit and a markdown table of ns/call (best of R runs of N calls)
with each figure's ratio to an empty method call taking the same arguments, so numbers
from different machines compare by ratio. The target is < 5 us per record_request.
Readers (Prometheus scrape, Triton statistics, A/B summary) are timed after the hot-path
runs, with every series populated, in us/call.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import random
import subprocess
import sys
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "uncommitted"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    sys.path.insert(0, ROOT)
    from prometheus_client import generate_latest

    from router import RouteConfig, Router
    from runtime.metrics.facade import Metrics

    router = Router({"m": RouteConfig.from_json({"weights": {1: 90, 2: 10}})}, seed=0)
    router.set_available("m", [1, 2])
    m = Metrics(router)
    rng = random.Random(0)
    lat = itertools.cycle([rng.lognormvariate(-6.0, 1.0) for _ in range(4096)])  # ~2.5 ms median
    nxt = lat.__next__
    rec = m.record_request

    class _Empty:
        def call(self, *a) -> None:
            pass

    empty = _Empty().call
    cases = [
        ("baseline: empty method call, same arguments",
         lambda: empty("m", 1, "split", "rest_v2", "OK", nxt(), 0.0, nxt(), 1)),
        ("record_request: OK", lambda: rec("m", 1, "split", "rest_v2", "OK", nxt(), 0.0, nxt(), 1)),
        ("record_request: OK, batch 8, queued",
         lambda: rec("m", 2, "sticky", "grpc_v2", "OK", nxt(), 1e-4, nxt(), 8)),
        ("record_request: error", lambda: rec("m", 1, "pinned", "rest_v2", "INVALID_ARGUMENT",
                                              nxt(), 0.0, 0.0, 0)),
        ("record_request: unrouted (no version)",
         lambda: rec("x", None, "unrouted", "rest_v2", "NOT_FOUND", nxt(), 0.0, 0.0, 0)),
        ("record_shadow", lambda: m.record_shadow("m", 1, 2, True, 1e-6, True)),
    ]
    results = []
    for name, fn in cases:
        best = min(timeit.repeat(fn, number=args.calls, repeat=args.repeat))
        results.append((name, best / args.calls * 1e9))

    readers = [
        ("scrape: generate_latest(registry)", lambda: generate_latest(m.registry)),
        ("statistics('m')", lambda: m.statistics("m")),
        ("summary('m')", lambda: m.summary("m")),
    ]
    read_results = []
    for name, fn in readers:
        best = min(timeit.repeat(fn, number=50, repeat=3))
        read_results.append((name, best / 50 * 1e6))

    base = results[0][1]
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} "
          f"cpus={os.cpu_count()} python={platform.python_version()}")
    print(f"commit: {_commit()}  calls: {args.calls:,} x best of {args.repeat}\n")
    print("| case | ns/call | x empty call |")
    print("|---|---:|---:|")
    for name, ns in results:
        print(f"| {name} | {ns:,.0f} | {ns / base:.1f} |")
    print("\n| reader | us/call |")
    print("|---|---:|")
    for name, us in read_results:
        print(f"| {name} | {us:,.0f} |")


if __name__ == "__main__":
    main()
