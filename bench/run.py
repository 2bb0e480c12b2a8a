"""splitserve benchmark suite: one command, servers started here on loopback, one table.

    python bench/run.py            # full run (about 7 minutes on 2 cores)
    python bench/run.py --quick    # shorter windows, fewer rows (about 3 minutes)

What it does, in one process tree on this machine:
  1. builds a temporary model repository: the bundled small MLP (64 -> 256 -> 256 -> 8)
     and a heavy MLP (512 -> 2048 x3 -> 8), two versions each (weights are generated,
     never committed), and a routing config with a 90/10 split (stable: 1, canary: 2);
  2. times the in-process forward pass (the limit) at batch 1 and the batch sizes batching
     produces;
  3. starts each server in turn and drives it with bench/loadgen.py (closed loop, fixed
     concurrency 1, 8, 32, fixed duration), REST (v2 JSON) and gRPC where it speaks it:
     splitserve with batching off and on, the plain FastAPI baseline
     (bench/baseline_server.py), and MLServer through a custom runtime when it installs
     into bench/.tools/mlserver-venv; Triton's perf_analyzer adds rows for splitserve when
     bench/.tools/perf_analyzer exists (bash bench/get_perf_analyzer.sh);
  4. the release scenario: p99 and failed requests at concurrency 8 on the heavy model
     while a new version is published and swapped in, against the same run without a swap;
  5. prints one markdown table with ratios and writes it to bench/RESULTS.md (or --out).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TOOLS = BENCH / ".tools"
PY = sys.executable
PERF_ANALYZER = TOOLS / "perf_analyzer"
MLSERVER_VENV = TOOLS / "mlserver-venv"
MLSERVER_VERSION = "1.7.1"
KEEP_MARKER = "<!-- analysis: bench/run.py keeps everything from this line on -->"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from serverproc import ChildProcess, ServerProcess, free_port  # noqa: E402  (tools/)


@dataclass(frozen=True)
class Workload:
    key: str
    model: str
    kwargs: dict
    d_in: int
    delay_us: int  # dynamic batching: max_queue_delay_us


WORKLOADS = {
    "small": Workload("small", "mlp", {"d_in": 64, "hidden": 256, "depth": 2, "d_out": 8}, 64, 500),
    "heavy": Workload("heavy", "heavy", {"d_in": 512, "hidden": 2048, "depth": 3, "d_out": 8},
                      512, 2000),
}


@dataclass
class Row:
    workload: str
    server: str
    proto: str
    driver: str
    c: str
    throughput: float | None = None
    p50: float | None = None
    p99: float | None = None
    errors: int | None = None
    batch: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- repository and files --------------------------------------------------------------

def model_yaml(w: Workload, batching: bool) -> str:
    kw = ", ".join(f"{k}: {v}" for k, v in w.kwargs.items())
    return (f"inputs:\n  - {{name: input, datatype: FP32, shape: [-1, {w.d_in}]}}\n"
            f"outputs:\n  - {{name: output, datatype: FP32, shape: [-1, {w.kwargs['d_out']}]}}\n"
            f"max_batch_size: 64\ndevice: cpu\nwarmup: true\nentry_point: build_model\n"
            f"kwargs: {{{kw}}}\nversion_policy: {{latest: 1}}\n"
            f"batching:\n  enabled: {'true' if batching else 'false'}\n"
            f"  max_queue_delay_us: {w.delay_us}\n  max_queue_size: 1024\n")


def build_versions(work: Path, workloads: list[Workload]) -> Path:
    import make_example_models as mk

    cache = work / "versions"
    for w in workloads:
        for seed in (1, 2, 3):
            d = cache / w.key / str(seed)
            if not (d / "model.safetensors").exists():
                mk.write_safetensors(d, seed=seed, **w.kwargs)
    return cache


def build_repo(root: Path, cache: Path, workloads: list[Workload], batching: bool,
               versions=(1, 2)) -> Path:
    import make_example_models as mk

    for w in workloads:
        mdir = root / w.model
        mk.write_model_folder(mdir, model_yaml(w, batching))
        for v in versions:
            shutil.copytree(cache / w.key / str(v), mdir / str(v))
    return root


def split_config(path: Path, workloads: list[Workload]) -> Path:
    lines = ["# written by bench/run.py: a 90/10 split on every model", "models:"]
    for w in workloads:
        lines += [f"  {w.model}:", "    labels: {stable: 1, canary: 2}",
                  "    weights: {stable: 90, canary: 10}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def body_file(path: Path, w: Workload, seed: int = 0) -> Path:
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((1, w.d_in)).astype(np.float32)
    path.write_text(json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, w.d_in],
                                            "data": x.ravel().tolist()}]}))
    return path


# ---- processes -------------------------------------------------------------------------

def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _log_path(logdir: Path, name: str) -> Path:
    return logdir / f"{name.replace(' ', '_').replace(',', '')}.log"


SERVE_FLAGS: list[str] = []  # --serve-flags: extra `splitserve serve` flags (e.g. --workers 4)


def splitserve(name: str, repo: Path, config: Path, logdir: Path) -> tuple[ChildProcess, str, str]:
    """`python -m runtime serve` on ports 0 (read from its log) -> (server, http, grpc)."""
    s = ServerProcess(repo, *SERVE_FLAGS, config=config, cwd=ROOT, name=name,
                      log_path=_log_path(logdir, name))
    s.wait_ready(180)
    return s, s.http_hostport, s.grpc_target


# ---- drivers ---------------------------------------------------------------------------

def loadgen(args: list[str], timeout: float) -> dict:
    p = subprocess.run([PY, str(BENCH / "loadgen.py"), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"loadgen failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def drive_http(host: str, path: str, body: Path, c: int, o) -> dict:
    return loadgen(["http", "--url", f"http://{host}{path}", "--body", str(body), "-c", str(c),
                    "--duration", str(o.duration), "--warmup", str(o.warmup)]
                   + (["--dump-latencies"] if getattr(o, "dump", False) else []),
                   o.duration + o.warmup + 120)


def drive_grpc(target: str, model: str, w: Workload, c: int, o) -> dict:
    return loadgen(["grpc", "--target", target, "--model", model, "--input",
                    f"input:FP32:1x{w.d_in}", "-c", str(c), "--duration", str(o.duration),
                    "--warmup", str(o.warmup)]
                   + (["--dump-latencies"] if getattr(o, "dump", False) else []),
                   o.duration + o.warmup + 120)


def perf_analyzer(model: str, url: str, proto: str, c: int, o) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".csv") as f:
        cmd = [str(PERF_ANALYZER), "-m", model, "-u", url, "-i", proto, "-b", "1",
               "--concurrency-range", f"{c}:{c}",
               "--measurement-interval", str(int(o.duration * 500)),
               "--max-trials", "3", "--stability-percentage", "999", "-f", f.name]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=o.duration * 8 + 120)
        if p.returncode != 0:
            raise RuntimeError((p.stdout + p.stderr).strip()[-600:])
        rows = list(csv.DictReader(io.StringIO(Path(f.name).read_text())))
    r = rows[-1]
    return {"throughput": float(r["Inferences/Second"]), "p50_ms": float(r["p50 latency"]) / 1e3,
            "p99_ms": float(r["p99 latency"]) / 1e3, "errors": 0}


def server_batches(host: str, model: str) -> tuple[int, int] | None:
    """(inference_count, execution_count) summed over versions, from Triton-style stats."""
    try:
        code, body = http_get(f"http://{host}/v2/models/{model}/stats")
        if code != 200:
            return None
        stats = json.loads(body)["model_stats"]
        return (sum(int(s.get("inference_count", 0)) for s in stats),
                sum(int(s.get("execution_count", 0)) for s in stats))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure(rows: list[Row], row: Row, fn, stats=None) -> None:
    before = stats() if stats else None
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001 - a row that cannot run says why
        row.note = f"failed: {str(e).splitlines()[-1][:160] if str(e) else type(e).__name__}"
        log(f"{row.workload} {row.server} {row.proto} c={row.c}: {row.note}")
        rows.append(row)
        return
    row.throughput, row.p50, row.p99 = r["throughput"], r["p50_ms"], r["p99_ms"]
    row.errors = r.get("errors", 0)
    row.extra = {k: r[k] for k in ("versions", "error_kinds", "max_ms") if k in r}
    after = stats() if stats else None
    if before and after and after[1] > before[1]:
        row.batch = (after[0] - before[0]) / (after[1] - before[1])
    log(f"{row.workload:5} {row.server:28} {row.proto:4} {row.driver:13} c={row.c:>2}: "
        f"{row.throughput:8.1f}/s p50={row.p50 or 0:.2f}ms p99={row.p99 or 0:.2f}ms "
        f"err={row.errors}" + (f" batch={row.batch:.1f}" if row.batch else ""))
    rows.append(row)


@dataclass
class Target:
    server: str
    proto: str
    drive: object  # (workload, concurrency, per-round options) -> loadgen result
    stats: object = None  # (workload) -> (inference_count, execution_count) | None


def baseline(w: Workload, repo: Path, body: Path, logdir: Path) -> tuple[ChildProcess, int]:
    name = f"baseline {w.key}"
    srv = ChildProcess([PY, str(BENCH / "baseline_server.py"), "--version-dir",
                        str(repo / w.model / "1"), "--port", "0"], name=name, cwd=ROOT,
                       log_path=_log_path(logdir, name))
    srv.wait_serving(120)  # the port it bound, from its log
    port = srv.http_port
    end = time.monotonic() + 120
    while True:  # ready when it answers an inference
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{w.model}/infer",
                                         data=body.read_bytes(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return srv, port
        except OSError:
            pass
        if not srv.alive() or time.monotonic() > end:
            srv.stop()
            raise RuntimeError(f"baseline did not start; see {srv.log_path}")
        time.sleep(0.2)


def measure_interleaved(rows: list[Row], w: Workload, c: int, targets: list[Target], o) -> None:
    """One row per target at concurrency c: o.rounds rounds, the order rotating each round;
    throughput over all measured time, percentiles over all latencies."""
    import numpy as np

    per = argparse.Namespace(duration=o.duration / o.rounds, warmup=o.warmup, dump=True)
    got: dict[int, list] = {i: [] for i in range(len(targets))}
    seen: dict[int, list[int]] = {i: [0, 0] for i in range(len(targets))}
    for r in range(o.rounds):
        for k in range(len(targets)):
            i = (k + r) % len(targets)
            t = targets[i]
            before = t.stats(w) if t.stats else None
            try:
                got[i].append(t.drive(w, c, per))
            except Exception as e:  # noqa: BLE001 - a row that cannot run says why
                got[i].append(e)
                continue
            after = t.stats(w) if t.stats else None
            if before and after:
                seen[i][0] += after[0] - before[0]
                seen[i][1] += after[1] - before[1]
    for i, t in enumerate(targets):
        row = Row(w.key, t.server, t.proto, "loadgen", str(c))
        ok = [x for x in got[i] if isinstance(x, dict)]
        if not ok:
            err = next((x for x in got[i] if isinstance(x, Exception)), None)
            row.note = f"failed: {str(err).splitlines()[-1][:160] if str(err) else type(err).__name__}"
            log(f"{w.key} {t.server} {t.proto} c={c}: {row.note}")
            rows.append(row)
            continue
        lat = np.asarray([v for x in ok for v in x.get("lat_ms", [])])
        row.throughput = sum(x["requests"] for x in ok) / (per.duration * len(ok))
        row.p50 = float(np.percentile(lat, 50)) if lat.size else None
        row.p99 = float(np.percentile(lat, 99)) if lat.size else None
        row.errors = sum(x.get("errors", 0) for x in ok)
        row.extra = {"rounds": len(ok), "versions": {}}
        for x in ok:
            for v, n in (x.get("versions") or {}).items():
                row.extra["versions"][v] = row.extra["versions"].get(v, 0) + n
        if seen[i][1] > 0:
            row.batch = seen[i][0] / seen[i][1]
        log(f"{row.workload:5} {row.server:28} {row.proto:4} c={c:>2}: {row.throughput:8.1f}/s "
            f"p50={row.p50 or 0:.2f}ms p99={row.p99 or 0:.2f}ms err={row.errors}"
            + (f" batch={row.batch:.1f}" if row.batch else ""))
        rows.append(row)


# ---- in-process limit ------------------------------------------------------------------

def in_process(cache: Path, w: Workload, batches: list[int], seconds: float) -> list[Row]:
    import numpy as np
    import torch

    from runtime.lifecycle.loader import load_version
    from runtime.repository.modelspec import parse_spec

    tmp = Path(tempfile.mkdtemp(prefix="bench-inproc-"))
    try:
        build_repo(tmp, cache, [w], batching=False, versions=(1,))
        spec = parse_spec(model_yaml(w, False))
        lm = load_version(tmp / w.model / "1", "model.safetensors", spec)
        out = []
        for b in batches:
            x = torch.randn(b, w.d_in)
            for _ in range(20):
                lm.forward([x])
            best = None
            for _ in range(3):  # the limit: the best of three rounds (others share the CPU)
                lat = []
                end = time.perf_counter() + seconds / 3
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    lm.forward([x])
                    lat.append(time.perf_counter() - t0)
                if best is None or np.median(lat) < np.median(best):
                    best = lat
            lat = np.asarray(best) * 1e3
            # batch / median call time: robust to the preemption stalls of a shared machine
            out.append(Row(w.key, "in-process forward", "-", "direct", f"b={b}",
                           throughput=b / float(np.percentile(lat, 50)) * 1e3,
                           p50=float(np.percentile(lat, 50)), p99=float(np.percentile(lat, 99)),
                           errors=0, batch=float(b)))
            log(f"{w.key:5} in-process b={b:>2}: {out[-1].throughput:9.0f} inf/s "
                f"p50={out[-1].p50 * 1e3:.0f}us")
        lm.release()
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- MLServer (optional, its own venv) -------------------------------------------------

def ensure_mlserver(install: bool) -> tuple[Path | None, str]:
    exe = MLSERVER_VENV / "bin" / "mlserver"
    if not exe.exists():
        if not install:
            return None, "MLServer not installed (run without --no-install to try)"
        log(f"installing mlserver=={MLSERVER_VERSION} into {MLSERVER_VENV} (bench only)")
        try:
            base = getattr(sys, "_base_executable", None) or PY
            subprocess.run([base, "-m", "venv", str(MLSERVER_VENV)], check=True,
                           capture_output=True, timeout=300)
            # uvloop 0.22+ raises in asyncio.get_event_loop(), which MLServer 1.7.1's
            # inference workers call at start (they crash-loop): pin the last that works.
            subprocess.run([str(MLSERVER_VENV / "bin" / "pip"), "install", "-q",
                            f"mlserver=={MLSERVER_VERSION}", "uvloop<0.22"], check=True,
                           capture_output=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as e:
            shutil.rmtree(MLSERVER_VENV, ignore_errors=True)
            return None, f"MLServer did not install: {e}"
    # torch, safetensors and yaml come from this environment, appended after MLServer's
    # own packages (a .pth file), instead of a second multi-GB torch install.
    site = next((MLSERVER_VENV / "lib").glob("python3*/site-packages"), None)
    import torch
    ours = Path(torch.__file__).resolve().parent.parent
    if site is not None:
        (site / "zz_splitserve_bench_torch.pth").write_text(str(ours) + "\n")
    chk = subprocess.run([str(MLSERVER_VENV / "bin" / "python"), "-c",
                          "import mlserver, torch, safetensors, yaml; print(mlserver.__version__)"],
                         capture_output=True, text=True)
    if chk.returncode != 0:
        return None, f"MLServer venv unusable: {chk.stderr.strip()[-300:]}"
    return exe, f"MLServer {chk.stdout.strip()}"


def mlserver(exe: Path, work: Path, repo: Path, workloads: list[Workload], logdir: Path):
    folder = work / "mlserver"
    # MLServer cannot bind port 0 and report it: the one place that probes for free ports.
    http, grpc, metrics = free_port(), free_port(), free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(
        {"http_port": http, "grpc_port": grpc, "metrics_port": metrics, "host": "127.0.0.1"}))
    for w in workloads:
        d = folder / w.model
        d.mkdir(exist_ok=True)
        (d / "model-settings.json").write_text(json.dumps({
            "name": w.model, "implementation": "mlserver_runtime.TorchMLP",
            "parameters": {"uri": str(repo / w.model / "1"), "version": "1"}}))
    s = ChildProcess([str(exe), "start", str(folder)], name="mlserver", cwd=ROOT,
                     env={"PYTHONPATH": str(BENCH)}, log_path=_log_path(logdir, "mlserver"))
    try:
        for w in workloads:
            s.wait_http(f"http://127.0.0.1:{http}/v2/models/{w.model}/ready", 180)
    except BaseException:
        s.stop()
        raise
    return s, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"


# ---- the release scenario --------------------------------------------------------------

def release(work: Path, cache: Path, o, logdir: Path) -> list[dict]:
    w = WORKLOADS["heavy"]
    repo = build_repo(work / "repo_release", cache, [w], batching=o.release_batching, versions=(1,))
    cfg = work / "release.yaml"
    cfg.write_text("models: {}\n")
    srv, host, _ = splitserve("splitserve release", repo, cfg, logdir)
    body = body_file(work / "body_release.json", w, seed=5)
    dur = o.release_duration
    args = ["http", "--url", f"http://{host}/v2/models/{w.model}/infer", "--body", str(body),
            "-c", "8", "--duration", str(dur), "--warmup", str(o.warmup)]
    out = []
    try:
        r = loadgen(args, dur + 120)
        out.append({"scenario": "no swap (version 1 serves throughout)", **r})
        log(f"release/no-swap: {r['throughput']:.0f}/s p99={r['p99_ms']:.1f}ms errors={r['errors']}")
        p = subprocess.Popen([PY, str(BENCH / "loadgen.py"), *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(o.warmup + dur * 0.2)
        t_pub = time.monotonic()
        tmp = repo / w.model / ".2.tmp"
        shutil.copytree(cache / w.key / "2", tmp)
        tmp.rename(repo / w.model / "2")  # publish by rename
        t_avail = t_only = None
        while p.poll() is None:
            try:
                meta = json.loads(http_get(f"http://{host}/v2/models/{w.model}")[1])
                vs = [str(v) for v in meta.get("versions", [])]
            except (OSError, ValueError):
                vs = []
            if t_avail is None and "2" in vs:
                t_avail = time.monotonic()
            if t_only is None and vs == ["2"]:
                t_only = time.monotonic()
            time.sleep(0.05)
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"loadgen failed: {stderr[-1000:]}")
        r = json.loads(stdout.strip().splitlines()[-1])
        r["swap"] = {"published_to_available_s": None if t_avail is None else t_avail - t_pub,
                     "published_to_only_v2_s": None if t_only is None else t_only - t_pub}
        out.append({"scenario": "swap: version 2 published, loaded, swapped in; 1 unloaded", **r})
        log(f"release/swap: {r['throughput']:.0f}/s p99={r['p99_ms']:.1f}ms errors={r['errors']} "
            f"versions={r.get('versions')} swap={r['swap']}")
    finally:
        srv.stop()
    return out


# ---- report ----------------------------------------------------------------------------

def env_info() -> dict:
    import numpy
    import torch

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
            "commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "torch_threads": torch.get_num_threads(),
            "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def _f(v, fmt="{:.1f}"):
    return "—" if v is None else fmt.format(v)


def ratios(rows: list[Row]) -> None:
    def find(w, server, proto, c):
        for r in rows:
            if (r.workload, r.server, r.proto, r.c, r.driver) == (w, server, proto, c, "loadgen") \
                    and r.throughput:
                return r
        return None
    for r in rows:
        if r.driver == "direct" or not r.throughput:
            continue
        base = find(r.workload, "baseline (FastAPI)", "REST", r.c)
        if base and r.server != "baseline (FastAPI)":
            r.extra["x_base"] = r.throughput / base.throughput
        mls = find(r.workload, "MLServer", r.proto, r.c) or find(r.workload, "MLServer", "REST", r.c)
        if mls and r.server.startswith("splitserve"):
            r.extra["x_mls"] = r.throughput / mls.throughput


def table(rows: list[Row]) -> str:
    out = ["| workload | server | protocol | driver | concurrency | infer/s | p50 ms | p99 ms "
           "| errors | exec batch | × baseline | × MLServer |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r.workload, r.server, r.proto, r.driver, r.c, _f(r.throughput, "{:,.0f}"),
                 _f(r.p50, "{:.3f}" if (r.p50 or 1) < 1 else "{:.2f}"),
                 _f(r.p99, "{:.3f}" if (r.p99 or 1) < 1 else "{:.2f}"),
                 _f(r.errors, "{}"), _f(r.batch, "{:.1f}"),
                 _f(r.extra.get("x_base"), "{:.2f}x"), _f(r.extra.get("x_mls"), "{:.2f}x")]
        if r.note:
            cells[5] = r.note
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def targets(rows: list[Row]) -> list[str]:
    def get(w, server, proto, c, driver="loadgen"):
        return next((r for r in rows if (r.workload, r.server, r.proto, r.c, r.driver) ==
                     (w, server, proto, c, driver) and r.throughput), None)

    lines = []

    def check(label, value, goal, fmt="{:.2f}x", higher=True):
        if value is None:
            lines.append(f"- {label}: not measured")
            return
        ok = value >= goal if higher else value < goal
        lines.append(f"- {label}: **{fmt.format(value)}** (target {'≥' if higher else '<'} "
                     f"{fmt.format(goal)}) — {'met' if ok else 'MISSED'}")

    base8 = get("small", "baseline (FastAPI)", "REST", "8")
    off8 = get("small", "splitserve, batching off", "REST", "8")
    off8g = get("small", "splitserve, batching off", "gRPC", "8")
    check("small, batching off, c=8, REST vs baseline REST",
          off8.throughput / base8.throughput if off8 and base8 else None, 1.0)
    check("small, batching off, c=8, gRPC vs baseline REST",
          off8g.throughput / base8.throughput if off8g and base8 else None, 1.5)
    base32 = get("heavy", "baseline (FastAPI)", "REST", "32")
    for proto in ("REST", "gRPC"):
        on32 = get("heavy", "splitserve, batching on", proto, "32")
        check(f"heavy, batching on, c=32, {proto} vs baseline REST (stretch 5x)",
              on32.throughput / base32.throughput if on32 and base32 else None, 3.0)
    xm = [r.extra["x_mls"] for r in rows if "x_mls" in r.extra]
    check("splitserve vs MLServer, worst row", min(xm) if xm else None, 2.5)
    inproc = {r.workload: r for r in rows if r.driver == "direct" and r.c == "b=1"}
    for w in ("small", "heavy"):
        for proto in ("REST", "gRPC"):
            r = get(w, "splitserve, batching off", proto, "1")
            ip = inproc.get(w)
            check(f"{w}, batch-1 p50 overhead over in-process forward, {proto}",
                  r.p50 - ip.p50 if r and ip and r.p50 is not None else None, 0.5,
                  "{:.3f} ms", higher=False)
    return lines


def release_table(rel: list[dict]) -> str:
    out = ["| scenario (heavy model, REST, c=8) | infer/s | p50 ms | p99 ms | max ms | failed "
           "| versions that answered | publish → v2 serving / v1 gone |",
           "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rel:
        sw = r.get("swap")
        swap = "—" if not sw else (f"{_f(sw['published_to_available_s'], '{:.2f}')} s / "
                                   f"{_f(sw['published_to_only_v2_s'], '{:.2f}')} s")
        out.append(f"| {r['scenario']} | {r['throughput']:,.0f} | {_f(r['p50_ms'], '{:.2f}')} | "
                   f"{_f(r['p99_ms'], '{:.2f}')} | {_f(r['max_ms'], '{:.2f}')} | {r['errors']} "
                   f"{r.get('error_kinds') or ''} | {r.get('versions')} | {swap} |")
    return "\n".join(out)


def write_results(path: Path, env: dict, o, rows: list[Row], rel: list[dict],
                  notes: list[str], wall: float) -> str:
    md = [f"# splitserve benchmark results", "",
          f"Written by `python bench/run.py{' --quick' if o.quick else ''}` "
          f"(run time {wall / 60:.1f} min).", "",
          "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()] + [
          f"| windows | per row: {o.rounds} interleaved round(s) of {o.warmup:g} s warm-up + "
          f"{o.duration / o.rounds:.2f} s measured ({o.duration:g} s in all) |", "",
          "## Throughput and latency", "",
          "Closed loop: each of *concurrency* clients sends its next request when the last "
          "answer is in (bench/loadgen.py; perf_analyzer rows where marked). One request = "
          "one row (batch 1), v2 JSON over REST, raw tensors over gRPC. splitserve runs with "
          "a 90/10 split (labels stable: 1, canary: 2) and metrics on. *exec batch* is the "
          "mean batch the server executed (its statistics); for in-process rows, the batch "
          "size. Ratios are against the baseline's REST row and MLServer's row of the same "
          "protocol (REST when it has none) at the same concurrency.", "",
          table(rows), "", "## Targets (issue 6, ratios from this run)", ""] + targets(rows) + [
          "", "## Release scenario", "", release_table(rel) if rel else "not run", "",
          "## Notes", ""] + [f"- {n}" for n in notes] + [""]
    text = "\n".join(md)
    kept = ""
    if path.exists():  # hand-written analysis below the marker survives a new run
        old = path.read_text()
        if KEEP_MARKER in old:
            kept = old[old.index(KEEP_MARKER):]
    path.write_text(text + ("\n" + kept if kept else ""))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s windows, no perf_analyzer rows")
    ap.add_argument("--duration", type=float, help="measured seconds per row (default 5; quick 2)")
    ap.add_argument("--warmup", type=float, help="unmeasured seconds per round (default 0.5)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per row (default 3; quick 1)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--workloads", default="small,heavy")
    ap.add_argument("--no-mlserver", action="store_true")
    ap.add_argument("--no-install", action="store_true", help="do not pip install MLServer")
    ap.add_argument("--no-grpc", action="store_true")
    ap.add_argument("--no-perf-analyzer", action="store_true")
    ap.add_argument("--no-release", action="store_true")
    ap.add_argument("--release-duration", type=float, help="seconds (default 12; quick 8)")
    ap.add_argument("--release-batching", action=argparse.BooleanOptionalAction, default=True,
                    help="dynamic batching on for the release scenario (default on)")
    ap.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, repos)")
    ap.add_argument("--serve-flags", default="", help="extra `splitserve serve` flags for every "
                    "splitserve row, e.g. '--workers 4'")
    o = ap.parse_args(argv)
    SERVE_FLAGS[:] = shlex.split(o.serve_flags)
    o.duration = o.duration or (2.0 if o.quick else 5.0)
    o.warmup = o.warmup if o.warmup is not None else 0.5
    o.rounds = max(1, o.rounds or (1 if o.quick else 3))
    o.release_duration = o.release_duration or (8.0 if o.quick else 12.0)
    conc = [c.strip() for c in o.concurrency.split(",") if c.strip()]
    wls = [WORKLOADS[k] for k in o.workloads.split(",")]
    t_start = time.monotonic()
    env = env_info()
    log(f"{env}")
    work = Path(tempfile.mkdtemp(prefix="splitserve-bench-"))
    logdir = work / "logs"
    logdir.mkdir()
    notes: list[str] = []
    rows: list[Row] = []
    rel: list[dict] = []
    servers: list[ChildProcess] = []
    try:
        cache = build_versions(work, wls)
        bodies = {w.key: body_file(work / f"body_{w.key}.json", w) for w in wls}
        cfg = split_config(work / "splitserve.yaml", wls)
        repo_off = build_repo(work / "repo_off", cache, wls, batching=False)
        repo_on = build_repo(work / "repo_on", cache, wls, batching=True)

        for w in wls:
            sizes = sorted({1, *(int(c) for c in conc if int(c) <= 64)})
            rows += in_process(cache, w, sizes, 0.5 if o.quick else 1.5)

        grpc_ok = not o.no_grpc
        if grpc_ok:
            try:
                import grpc  # noqa: F401

                from runtime.protocol.pb import grpc_service_pb2_grpc  # noqa: F401
                from runtime.server.grpc import servicers as rpc  # noqa: F401
            except ImportError as e:
                grpc_ok = False
                notes.append(f"gRPC rows skipped: {e}")
        pa_ok = PERF_ANALYZER.exists() and not o.no_perf_analyzer and not o.quick
        if not PERF_ANALYZER.exists():
            notes.append("perf_analyzer rows skipped: run `bash bench/get_perf_analyzer.sh` "
                         "to fetch it into bench/.tools/")

        # Every server is up at once and each cell is measured in interleaved rounds (the
        # server order rotates each round), so a burst of load from elsewhere on a shared
        # machine falls on all servers alike rather than on whichever ran at that moment.
        targets: list[Target] = []
        for label, repo in (("splitserve, batching off", repo_off),
                            ("splitserve, batching on", repo_on)):
            log(f"starting {label}")
            srv, host, target = splitserve(label, repo, cfg, logdir)
            servers.append(srv)
            stats = (lambda w, h=host: server_batches(h, w.model))
            targets.append(Target(label, "REST", lambda w, c, r, h=host: drive_http(
                h, f"/v2/models/{w.model}/infer", bodies[w.key], c, r), stats))
            if grpc_ok:
                targets.append(Target(label, "gRPC", lambda w, c, r, t=target: drive_grpc(
                    t, w.model, w, c, r), stats))
            if label.endswith("off"):
                off = (host, target, stats)
        ports = {}
        for w in wls:  # the plain FastAPI baseline: one process per model (a global)
            log(f"starting baseline for {w.model}")
            srv, ports[w.key] = baseline(w, repo_off, bodies[w.key], logdir)
            servers.append(srv)
        targets.append(Target("baseline (FastAPI)", "REST", lambda w, c, r: drive_http(
            f"127.0.0.1:{ports[w.key]}", f"/v2/models/{w.model}/infer", bodies[w.key], c, r)))
        if not o.no_mlserver:
            exe, what = ensure_mlserver(install=not o.no_install)
            if exe is None:
                notes.append(f"MLServer rows skipped: {what}")
                log(notes[-1])
            else:
                try:
                    srv, mhost, mtarget = mlserver(exe, work, repo_off, wls, logdir)
                    servers.append(srv)
                    notes.append(f"{what} (default settings: parallel_workers=1, i.e. inference "
                                 f"in one worker process) with the custom runtime "
                                 f"bench/mlserver_runtime.py; torch comes from this environment")
                    targets.append(Target("MLServer", "REST", lambda w, c, r: drive_http(
                        mhost, f"/v2/models/{w.model}/infer", bodies[w.key], c, r)))
                    if grpc_ok and not o.quick:
                        targets.append(Target("MLServer", "gRPC", lambda w, c, r: drive_grpc(
                            mtarget, w.model, w, c, r)))
                except RuntimeError as e:
                    notes.append(f"MLServer rows skipped: {e}")
                    log(notes[-1])
        for w in wls:
            for c in conc:
                measure_interleaved(rows, w, int(c), targets, o)
            # perf_analyzer cross-checks the small model's protocol overhead (the targets
            # that concern the web stack); each row costs ~10 s, so only those.
            if pa_ok and w.key == "small":
                host, target, stats = off
                st = (lambda: stats(w))
                for c in conc:
                    for proto, url in (("gRPC", target), ("REST", host)):
                        measure(rows, Row(w.key, "splitserve, batching off", proto,
                                          "perf_analyzer", c),
                                lambda: perf_analyzer(w.model, url, proto.lower()
                                                      .replace("rest", "http"), int(c), o), st)
        for s in servers:
            s.stop()

        if not o.no_release and "heavy" in [w.key for w in wls]:
            log("release scenario")
            rel = release(work, cache, o, logdir)
    finally:
        for s in servers:
            s.stop()
        if o.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    # Without reported batches, a batching-on server's execution count equals its request
    # count: show nothing rather than a misleading 1.0.
    on_rows = [r for r in rows if r.server == "splitserve, batching on" and r.batch]
    if on_rows and all(abs(r.batch - 1.0) < 1e-9 for r in on_rows):
        for r in on_rows:
            r.batch = None
        notes.append("exec batch for batching-on rows: not reported by the server's statistics "
                     "(the batcher's executed batches are not wired into metrics)")
    ratios(rows)
    notes.append("bench/loadgen.py is a Python client on the same machine: it takes CPU from the "
                 "server under test (perf_analyzer, in C++, takes less), equally for every server.")
    env["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = write_results(o.out, env, o, rows, rel, notes, time.monotonic() - t_start)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
