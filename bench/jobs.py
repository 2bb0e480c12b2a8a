"""Jobs against the synchronous path, on the same model and server, one run.

`python bench/jobs.py [--n 400] [--clients 8]`: starts `python -m runtime serve` over the
bundled MLP twice: with the SQLite queue, then with the Redis Streams queue (a
redis-server child on a unix socket; skipped when redis-server is not installed). Each
run measures, with `--clients` concurrent clients:
  sync    N infer calls: throughput and latency (client side)
  submit  N job submits: throughput (202s per second)
  e2e     each job's finished_at - created_at (server clock) and the time until all N
          had succeeded (drain throughput)
and prints ratios to the synchronous path. Figures are this machine's, at this moment.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import httpx  # noqa: E402

import make_example_models as mk  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def timed(url: str, n: int, clients: int, path: str) -> tuple[float, list[float], list[str]]:
    """(calls per second, per-call ms, response ids) of n POSTs from `clients` threads."""
    def one(c: httpx.Client):
        t = time.perf_counter()
        r = c.post(url + path, json=BODY)
        assert r.status_code in (200, 202), r.text
        return (time.perf_counter() - t) * 1e3, r.json().get("id")
    pool = [httpx.Client(timeout=60) for _ in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(lambda i: one(pool[i % clients]), range(n)))
    wall = time.perf_counter() - t0
    for c in pool:
        c.close()
    return n / wall, [r[0] for r in res], [r[1] for r in res]


def run(name: str, root: Path, cfg: Path, n: int, clients: int) -> dict:
    srv = ServerProcess(root, "--access-log", "off", config=cfg, name=name).wait_ready()
    try:
        url = srv.url
        timed(url, 50, clients, "/v2/models/mlp/infer")  # warm
        sync_rps, sync_ms, _ = timed(url, n, clients, "/v2/models/mlp/infer")
        t0 = time.perf_counter()
        sub_rps, sub_ms, ids = timed(url, n, clients, "/v2/models/mlp/jobs")
        c = httpx.Client(timeout=60)
        while True:
            page = c.get(url + "/v1/jobs", params={"model": "mlp", "state": "succeeded",
                                                   "limit": 500}).json()
            done = len(page["jobs"])
            while page["next"] is not None and done < n:
                page = c.get(url + "/v1/jobs", params={"model": "mlp", "state": "succeeded",
                                                       "limit": 500, "cursor": page["next"]}).json()
                done += len(page["jobs"])
            if done >= n:
                break
            time.sleep(0.05)
        drain_s = time.perf_counter() - t0
        e2e = []
        for i in ids:
            j = c.get(url + f"/v1/jobs/{i}").json()
            e2e.append((j["finished_at"] - j["created_at"]) * 1e3)
        c.close()
        return {"name": name, "sync_rps": sync_rps, "sync_p50": pct(sync_ms, 50), "sync_p99": pct(sync_ms, 99),
                "submit_rps": sub_rps, "submit_p50": pct(sub_ms, 50), "e2e_p50": pct(e2e, 50),
                "e2e_p99": pct(e2e, 99), "e2e_mean": statistics.fmean(e2e), "drain_rps": n / drain_s}
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4, help="jobs.concurrency")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp())
    root = base / "repo"
    mk.write_model_folder(root / "mlp")
    mk.write_safetensors(root / "mlp" / "1", 1)
    common = f"  poll_s: 0.02\n  concurrency: {args.concurrency}\n  max_queued: {args.n * 2}\n"
    rows = []
    sq = base / "sqlite.yaml"
    sq.write_text(f"jobs:\n  path: {base / 'jobs.sqlite'}\n{common}")
    rows.append(run("sqlite", root, sq, args.n, args.clients))
    redis = None
    exe = shutil.which("redis-server")
    if exe is None:
        print("redis-server not installed: the Redis run is skipped")
    else:
        sock = base / "redis.sock"
        redis = subprocess.Popen([exe, "--port", "0", "--unixsocket", str(sock), "--save", "",
                                  "--appendonly", "no", "--dir", str(base)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            rc = base / "redis.yaml"
            rc.write_text(f"jobs:\n  url: unix://{sock}\n{common}")
            rows.append(run("redis", root, rc, args.n, args.clients))
        finally:
            redis.terminate()
            redis.wait(10)
    print(f"n={args.n} clients={args.clients} jobs.concurrency={args.concurrency} model=mlp (CPU)")
    print(f"{'backend':8} {'sync/s':>8} {'sync p50':>9} {'submit/s':>9} {'submit p50':>11} "
          f"{'e2e p50':>8} {'e2e p99':>8} {'drain/s':>8} {'submit/sync':>12} {'drain/sync':>11}")
    for r in rows:
        print(f"{r['name']:8} {r['sync_rps']:8.0f} {r['sync_p50']:7.2f}ms {r['submit_rps']:9.0f} "
              f"{r['submit_p50']:9.2f}ms {r['e2e_p50']:6.1f}ms {r['e2e_p99']:6.1f}ms "
              f"{r['drain_rps']:8.0f} {r['submit_rps'] / r['sync_rps']:12.2f} "
              f"{r['drain_rps'] / r['sync_rps']:11.2f}")


if __name__ == "__main__":
    main()
