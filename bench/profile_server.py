"""Profile splitserve's serving hot path under load with py-spy (sampling, all threads).

    python bench/profile_server.py --proto rest -c 8            # small model, batching off
    python bench/profile_server.py --workload heavy --batching --proto rest -c 32

Starts splitserve like bench/run.py does (same repository and 90/10 split), drives it
with bench/loadgen.py, records with py-spy (installed on first use into bench/.tools/pyspy,
never a project dependency), and prints where the server's CPU goes: the top functions by
self time and by inclusive time, per thread group, from py-spy's collapsed stacks. The raw
profile stays in bench/out/ for a flame graph (`py-spy record --format speedscope` etc.).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402

PYSPY = bench.TOOLS / "pyspy" / "bin" / "py-spy"


def ensure_pyspy() -> Path:
    if not PYSPY.exists():
        subprocess.run([bench.PY, "-m", "pip", "install", "-q", "--target",
                        str(PYSPY.parent.parent), "py-spy"], check=True)
    return PYSPY


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{f}:{m.group('fn')}"


def summarize(raw: Path, top: int) -> str:
    self_t = collections.Counter()
    incl = collections.Counter()
    threads = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():  # a frame name with a line break in it
            continue
        n = int(n)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        frames = [f for f in frames if not f.startswith(("thread", "process"))]
        if not frames:
            continue
        total += n
        names = [_short(f) for f in frames]
        threads[thread] += n
        self_t[names[-1]] += n
        for name in set(names):
            incl[name] += n
    out = [f"samples: {total}", "", "by thread:"]
    out += [f"  {n / total:6.1%}  {t}" for t, n in threads.most_common(8)]
    out += ["", f"top {top} by self time:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in self_t.most_common(top)]
    ours = [(f, n) for f, n in incl.most_common() if f.startswith(("runtime/", "router/"))
            or "starlette" in f or "fastapi" in f or "uvicorn" in f or "h11" in f
            or "grpc" in f or "orjson" in f]
    out += ["", f"top {top} by inclusive time (server and web stack frames):"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in ours[:top]]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="small", choices=list(bench.WORKLOADS))
    ap.add_argument("--proto", default="rest", choices=["rest", "grpc"])
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--batching", action="store_true")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--all-threads", action="store_true",
                    help="every sample, not only those holding the GIL (includes waiting)")
    o = ap.parse_args(argv)
    spy = ensure_pyspy()
    w = bench.WORKLOADS[o.workload]
    work = Path(tempfile.mkdtemp(prefix="splitserve-prof-"))
    outdir = HERE / "out"
    outdir.mkdir(exist_ok=True)
    raw = outdir / f"profile-{o.workload}-{o.proto}-c{o.concurrency}{'-batching' if o.batching else ''}.txt"
    (work / "logs").mkdir()
    srv = None
    try:
        cache = bench.build_versions(work, [w])
        repo = bench.build_repo(work / "repo", cache, [w], batching=o.batching)
        cfg = bench.split_config(work / "splitserve.yaml", [w])
        body = bench.body_file(work / "body.json", w)
        srv, host, target = bench.splitserve("splitserve profile", repo, cfg, work / "logs")

        class O:
            duration, warmup = o.duration + 2, 1.0

        result = {}

        def drive():
            if o.proto == "rest":
                result.update(bench.drive_http(host, f"/v2/models/{w.model}/infer", body,
                                               o.concurrency, O))
            else:
                result.update(bench.drive_grpc(target, w.model, w, o.concurrency, O))

        t = threading.Thread(target=drive)
        t.start()
        time.sleep(1.5)
        cmd = [str(spy), "record", "--pid", str(srv.proc.pid), "--duration", str(int(o.duration)),
               "--rate", str(o.rate), "--format", "raw", "--threads", "--nonblocking",
               "-o", str(raw)]
        if not o.all_threads:
            cmd.append("--gil")  # only samples holding the GIL: where Python time goes
        if o.native:  # native unwinding needs py-spy to pause the process while sampling
            cmd = [c for c in cmd if c != "--nonblocking"] + ["--native"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        t.join()
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            return 1
        print(f"load: {result.get('throughput', 0):.0f} infer/s, p50 {result.get('p50_ms') or 0:.2f} ms "
              f"(slower than unprofiled: py-spy samples the process)")
        print(summarize(raw, o.top))
        print(f"\nraw collapsed stacks: {raw}")
    finally:
        if srv is not None:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
