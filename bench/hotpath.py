"""A/B of hot-path settings on the bundled small model, interleaved to beat a noisy machine.

    python bench/hotpath.py --variant base="--loop asyncio --http h11" \
        --variant new="--loop auto --http auto" --rounds 3 -c 8 [--workers 2] [--append]

Each round starts every variant in turn (a fresh `splitserve serve` on free ports, with the
variant's extra flags, access log off, no routing config) and drives it with each client:
JSON REST (`rest-json`), gRPC over raw HTTP/2 frames (`grpc`) and through grpc.aio's client
(`grpcio`) from bench/loadgen.py, and Triton's perf_analyzer over gRPC (unary `pa-grpc`,
ModelStreamInfer `pa-grpc-stream`) and over HTTP with binary tensors (`pa-http`) when
bench/.tools/perf_analyzer exists. Rounds alternate the
variants (A, B, A, B, ...), so background load hits both alike; the table reports the
median per variant and client. `--ref COMMIT` adds a variant served from a checkout of
another commit (a temporary git worktree, removed at the end), e.g. the baseline before a change.
With --append, a dated section goes to --results (bench/RESULTS_HOTPATH.md).

A variant's leading NAME=VALUE words are environment variables of its server, and
`{otlp}` in them is the endpoint of an OTLP/HTTP receiver this script runs on loopback
(tools/otlp_receiver.py), e.g. tracing at 1%:
    --variant off= --variant on1="OTEL_EXPORTER_OTLP_ENDPOINT={otlp} \
        OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01"
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from serverproc import ServerProcess  # noqa: E402  (tools/)
from workers import load  # noqa: E402  (bench/workers.py: the same loadgen run)

PA = ROOT / "bench" / ".tools" / "perf_analyzer"
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.1] * 64}]}
CLIENTS = ("rest-json", "grpc", "grpcio", "pa-grpc", "pa-grpc-stream", "pa-http")


_ENV_WORD = re.compile(r"[A-Z][A-Z0-9_]*=")


def split_env(words: list[str], otlp: str) -> tuple[dict[str, str], list[str]]:
    """A variant's leading NAME=VALUE words (its environment) and its serve flags."""
    env = {}
    while words and _ENV_WORD.match(words[0]):
        k, _, v = words.pop(0).partition("=")
        env[k] = v.replace("{otlp}", otlp)
    return env, words


def serve(root: Path, extra: list[str], tmp: Path, otlp: str = ""):
    """`splitserve serve` from checkout `root` (tools/serverproc.py), once it serves."""
    cfg = tmp / "empty.yaml"
    cfg.write_text("{}\n")
    env, extra = split_env(list(extra), otlp)
    p = ServerProcess(ROOT / "model_repository", "--access-log", "off", *extra, config=cfg,
                      cwd=root, env={"PYTHONPATH": str(root), **env}).wait_serving(300)
    return p, {"http": p.http_hostport, "grpc": p.grpc_target}


def loadgen(kind: str, addr: str, c: int, duration: float, channels: int, tmp: Path) -> dict:
    r = load("rest" if kind == "rest-json" else "grpc", addr, c, duration, tmp, channels,
             "grpcio" if kind == "grpcio" else "raw")
    return {"infer_per_s": r["throughput"], "p50_ms": r["p50_ms"], "errors": r["errors"]}


def perf_analyzer(proto: str, addr: str, c: int, duration: float, streaming: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".csv") as f:
        cmd = [str(PA), "-m", "mlp", "-u", addr, "-i", proto, "-b", "1",
               *(["--streaming"] if streaming else []),
               "--concurrency-range", f"{c}:{c}", "--measurement-interval",
               str(int(duration * 1000)), "--max-trials", "3", "--stability-percentage", "999",
               "-f", f.name]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 6 + 120)
        if p.returncode != 0:
            raise RuntimeError((p.stdout + p.stderr).strip()[-600:])
        r = list(csv.DictReader(io.StringIO(Path(f.name).read_text())))[-1]
    return {"infer_per_s": float(r["Inferences/Second"]), "p50_ms": float(r["p50 latency"]) / 1e3,
            "errors": 0}


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a server and its worker processes so far."""
    import psutil
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def served(http: str) -> int:
    """Successful mlp requests so far, from the server's own statistics (all workers)."""
    import urllib.request
    with urllib.request.urlopen(f"http://{http}/v2/models/mlp/stats", timeout=10) as r:
        doc = json.load(r)
    return sum(int(m["inference_stats"]["success"]["count"]) for m in doc["model_stats"])


def measure(kind: str, addr: dict, o, pid: int) -> dict:
    """One client's window, plus the server's CPU time per request over it: CPU per
    request hardly moves with what else runs on the machine, throughput does."""
    cpu0, n0 = tree_cpu_s(pid), served(addr["http"])
    if not kind.startswith("pa-"):
        r = loadgen(kind, addr["http"] if kind == "rest-json" else addr["grpc"],
                    o.concurrency, o.duration, o.channels, o.tmp)
    else:
        proto = kind.split("-")[1]
        r = perf_analyzer(proto, addr[proto if proto == "grpc" else "http"], o.concurrency,
                          o.duration, streaming=kind.endswith("-stream"))
    cpu1, n1 = tree_cpu_s(pid), served(addr["http"])
    r["cpu_us_per_req"] = (cpu1 - cpu0) / max(1, n1 - n0) * 1e6
    return r


def checkout(commit: str, tmp: Path) -> Path:
    """A detached worktree of `commit` in `tmp` (the code a --ref variant serves)."""
    path = tmp / f"ref-{re.sub(r'[^A-Za-z0-9_.-]', '_', commit)}"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT,
                   check=True, capture_output=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="a variant: name and the extra serve flags (repeatable)")
    ap.add_argument("--ref", action="append", default=[], metavar="NAME=COMMIT[:FLAGS]",
                    help="a variant served from another commit's code")
    ap.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--channels", type=int, default=1, help="loadgen gRPC connections")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--title", default="hot path A/B")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS_HOTPATH.md")
    o = ap.parse_args()
    variants = [(n, ROOT, shlex.split(f)) for n, _, f in (v.partition("=") for v in o.variant)]
    clients = [c for c in o.clients if not c.startswith("pa-") or PA.exists()]
    results: dict[tuple[str, str], list[dict]] = {}
    t_start = time.time()
    receiver = None
    if any("{otlp}" in w for _, _, f in variants for w in f):
        from otlp_receiver import OtlpReceiver  # tools/
        receiver = OtlpReceiver()
    otlp = f"http://127.0.0.1:{receiver.port}" if receiver else ""
    with tempfile.TemporaryDirectory() as t:
        o.tmp = Path(t)
        for r in o.ref:
            name, _, rest = r.partition("=")
            commit, _, flags = rest.partition(":")
            variants.append((name, checkout(commit, o.tmp), shlex.split(flags)))
        for rnd in range(o.rounds):
            order = variants if rnd % 2 == 0 else variants[::-1]
            for name, root, extra in order:
                p, addr = serve(root, extra, o.tmp, otlp)
                try:
                    for kind in clients:
                        r = measure(kind, addr, o, p.pid)
                        results.setdefault((name, kind), []).append(r)
                        print(json.dumps({"round": rnd, "variant": name, "client": kind, **r}),
                              flush=True)
                finally:
                    p.stop(120)
        for _name, root, _extra in variants:
            if root != ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(root)], cwd=ROOT,
                               capture_output=True)
    if receiver is not None:
        print(json.dumps({"otlp_requests": receiver.requests, "spans": len(receiver.spans)}))
        receiver.stop()
    lines = table(variants, clients, results, o, time.time() - t_start)
    print("\n".join(lines))
    if o.append:
        with open(o.results, "a") as f:
            f.write("\n".join(lines) + "\n")


def table(variants, clients, results, o, took: float) -> list[str]:
    import torch
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else []
    lines = [f"\n## {o.title}: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Machine: 2-core VM ({platform.node()}, {os.cpu_count()} CPUs); commit {commit}; "
             f"torch {torch.__version__}; python {platform.python_version()}. Small model (mlp), "
             f"batch 1, c={o.concurrency}, {o.duration:g} s per window, {o.rounds} interleaved "
             f"rounds ({took / 60:.1f} min), medians; load average after: {' '.join(load)}. "
             f"Clients on the same 2 cores.", "",
             "Each cell: median infer/s, and in brackets the server's CPU time per request "
             "(µs, all its processes; lower is better, and far less noisy than infer/s).", "",
             "| variant | flags | " + " | ".join(f"{c}" for c in clients) + " |",
             "|---|---|" + "---:|" * len(clients)]
    for name, root, extra in variants:
        cells = []
        for c in clients:
            rs = results.get((name, c), [])
            cells.append(f"{statistics.median(r['infer_per_s'] for r in rs):,.0f} "
                         f"({statistics.median(r['cpu_us_per_req'] for r in rs):,.0f} µs)"
                         if rs else "-")
        where = "" if root == ROOT else f" (code of {root.name[4:]})"  # ref-<commit>
        lines.append(f"| {name} | `{' '.join(extra) or '-'}`{where} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
