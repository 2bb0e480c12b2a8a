"""Per-call cost of Router.pick (and sticky_key) with a 90/10 split.

    python bench/bench_router.py [--calls N] [--repeat R]

Imports only `router/` (never the runtime). Prints date, machine, commit and a markdown
table of ns/call (best of R runs of N calls) with each figure's ratio to an empty method
call, so numbers from different machines can be compared by ratio.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
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
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    sys.path.insert(0, ROOT)
    from router import RouteConfig, Router

    config = RouteConfig.from_json(
        {
            "labels": {"stable": 1, "canary": 2},
            "weights": {"stable": 90, "canary": 10},
            "sticky": {"header": "x-user-id"},
        }
    )
    shadowed = RouteConfig.from_json({**config.to_json(), "shadow": {"target": "canary", "percent": 5}})
    r = Router({"m": config, "s": shadowed}, seed=0)
    r.set_available("m", [1, 2])
    r.set_available("s", [1, 2])
    pick = r.pick
    headers = {"x-user-id": "user-12345", "content-type": "application/json"}

    class _Empty:
        def call(self) -> None:
            pass

    cases = [
        ("baseline: empty method call", _Empty().call),
        ("pick: unkeyed split", lambda: pick("m")),
        ("pick: keyed sticky", lambda: pick("m", key="user-12345")),
        ("pick: pinned version", lambda: pick("m", version=2)),
        ("pick: label", lambda: pick("m", label="canary")),
        ("pick: unkeyed split + 5% shadow", lambda: pick("s")),
        ("sticky_key + keyed pick", lambda: pick("m", key=r.sticky_key("m", headers, {}))),
    ]
    results = []
    for name, fn in cases:
        best = min(timeit.repeat(fn, number=args.calls, repeat=args.repeat))
        results.append((name, best / args.calls * 1e9))

    base = results[0][1]
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} "
        f"cpus={os.cpu_count()} python={platform.python_version()}"
    )
    print(f"commit: {_commit()}  calls: {args.calls:,} x best of {args.repeat}\n")
    print("| case | ns/call | x empty call |")
    print("|---|---:|---:|")
    for name, ns in results:
        print(f"| {name} | {ns:,.0f} | {ns / base:.1f} |")


if __name__ == "__main__":
    main()
