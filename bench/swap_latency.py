"""Time from a completed version folder (renamed into place) to its first served request.

`python bench/swap_latency.py [--cycles N] [--quiet-s S]`: starts `python -m runtime
serve` (tools/serverproc.py: ports 0, read from its log) over a temporary repository with
the bundled MLP, publishes version 2 by rename, polls the routed infer endpoint until
version 2 answers, deletes it, waits for version 1 again, and prints the figures.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import httpx  # noqa: E402

import make_example_models as mk  # noqa: E402
from serverproc import ServerProcess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--quiet-s", type=float, default=0.5, help="repository.quiet_s (default 0.5, the default setting)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp())
    root = base / "repo"
    root.mkdir()
    mk.write_model_folder(root / "mlp")
    mk.write_safetensors(root / "mlp" / "1", 1)
    mk.write_safetensors(base / "st2", 2)
    cfg = base / "splitserve.yaml"
    cfg.write_text(f"repository:\n  quiet_s: {args.quiet_s}\nmodels: {{}}\n")
    srv = ServerProcess(root, config=cfg, name="swap_latency").wait_ready()
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
    c = httpx.Client()
    served = lambda: c.post(srv.url + "/v2/models/mlp/infer", json=body).headers.get("x-model-version")
    res = []
    try:
        for _ in range(args.cycles):
            shutil.copytree(base / "st2", root / "mlp" / ".2.tmp")
            t0 = time.perf_counter()
            (root / "mlp" / ".2.tmp").rename(root / "mlp" / "2")
            while served() != "2":
                pass
            res.append((time.perf_counter() - t0) * 1e3)
            shutil.rmtree(root / "mlp" / "2")
            while served() != "1":
                pass
        loaded = srv.wait_line(r"event=loaded servable=\S*mlp\S* .*device=", 5)
        device = re.search(r"device=(\S+)", loaded).group(1)
        print(f"device={device} quiet_s={args.quiet_s} folder->first served ms: "
              f"{[round(x, 1) for x in res]} median={statistics.median(res):.1f} "
              f"(median minus quiet_s: {statistics.median(res) - args.quiet_s * 1e3:.1f})")
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
