"""The yardstick: a plain FastAPI + uvicorn + torch server, as one would write it by hand.

    python bench/baseline_server.py --version-dir model_repository/mlp/1 [--port 8100]

The model is built once, as a global, from `model.py` + `model.safetensors` and the
kwargs in `model.yaml`; one endpoint, the KServe v2 JSON infer, runs the forward pass
inline in the handler. Nothing else: no routing, metrics, validation or versions.
With `--port 0` (the default) it binds a free port and logs it the way splitserve does
(`event=serving http=HOST:PORT ...`), so tools/serverproc.py reads it from the log.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import uvicorn
import yaml
from fastapi import FastAPI, Request
from safetensors.torch import load_file

app = FastAPI()
MODEL: torch.nn.Module | None = None
OUTPUT_NAME = "output"


def load(version_dir: Path) -> torch.nn.Module:
    model_dir = version_dir.parent
    spec = yaml.safe_load((model_dir / "model.yaml").read_text()) or {}
    arch = version_dir / "model.py"
    if not arch.exists():
        arch = model_dir / "model.py"
    mspec = importlib.util.spec_from_file_location("baseline_arch", arch)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    m = getattr(mod, spec.get("entry_point", "build_model"))(**spec.get("kwargs", {}))
    m.load_state_dict(load_file(str(version_dir / "model.safetensors")))
    return m.eval()


@app.post("/v2/models/{model_name}/infer")
async def infer(model_name: str, request: Request):
    body = await request.json()
    inp = body["inputs"][0]
    x = torch.from_numpy(np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"]))
    with torch.inference_mode():
        y = MODEL(x)
    return {"model_name": model_name, "outputs": [
        {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(y.shape),
         "data": y.flatten().tolist()}]}


def main() -> None:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--version-dir", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 (default): any free port, logged")
    args = ap.parse_args()
    MODEL = load(args.version_dir)
    # IPPROTO_TCP explicitly, as uvicorn's own bind does: asyncio sets TCP_NODELAY on
    # accepted sockets only when the listener says TCP (else ~40 ms delayed-ACK stalls).
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections queue from here on, before uvicorn accepts them
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    print(f"event=serving http={args.host}:{port} grpc={args.host}:None", file=sys.stderr,
          flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
