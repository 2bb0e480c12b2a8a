"""Shared helpers for the reliability scenarios (issue 7).

The root `tests/conftest.py` is loaded here by its path under its own module name, so
these tests do not depend on which `conftest` module happens to sit in `sys.modules`
(another directory's conftest.py may have taken that name first).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _root_conftest():
    name = "_splitserve_root_conftest"
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


_c = _root_conftest()
LiveServer = _c.LiveServer
MLP_YAML: str = _c.MLP_YAML
expected_output = _c.expected_output
wait_until = _c.wait_until
MLP_ALL = MLP_YAML.replace("version_policy: {latest: 1}", "version_policy: all")
assert MLP_ALL != MLP_YAML

X = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                    "data": X.ravel().tolist()}]}


def answer_of(seed: int, x: np.ndarray = X) -> np.ndarray:
    import torch
    return expected_output(seed, torch.from_numpy(x)).numpy()


def outputs_of(resp_json: dict, rows: int = 2) -> np.ndarray:
    return np.array(resp_json["outputs"][0]["data"], dtype=np.float32).reshape(rows, 8)


# ---- small models with controllable behaviour ------------------------------------------
SLOW_ARCH = '''
import time, torch
from torch import nn
DELAY = {delay}
class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 8)
    def forward(self, input):
        time.sleep(DELAY)
        return self.lin(input)
def build_model():
    return Slow()
'''

SLOW_YAML = """inputs: [{{name: input, datatype: FP32, shape: [-1, 64]}}]
outputs: [{{name: output, datatype: FP32, shape: [-1, 8]}}]
max_batch_size: 8
version_policy: all
warmup: false
{extra}
"""


def write_linear_weights(vdir: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file
    vdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 8)
    save_file({f"lin.{k}": t.contiguous() for k, t in lin.state_dict().items()},
              str(vdir / "model.safetensors"))


def write_slow_model(repo: Path, name: str = "slow", delay: float = 0.5,
                     versions: tuple[int, ...] = (1,),
                     extra_yaml: str = "batching: {enabled: false}") -> Path:
    """A model whose forward sleeps `delay` seconds (Linear 64 -> 8); one executor thread
    per version, so concurrent requests queue behind each other (batching off unless
    `extra_yaml` says otherwise)."""
    m = repo / name
    m.mkdir(parents=True, exist_ok=True)
    (m / "model.py").write_text(SLOW_ARCH.format(delay=delay))
    (m / "model.yaml").write_text(SLOW_YAML.format(extra=extra_yaml))
    for v in versions:
        write_linear_weights(m / str(v), seed=v)
    return m


# ---- processes, ports, memory ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_cli(repo: Path, cwd: Path, *args: str, config: Path | None = None,
              log: Path | None = None) -> tuple[subprocess.Popen, int, int]:
    """`python -m runtime serve` as a child process on free ports -> (proc, http, grpc)."""
    http, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "runtime", "serve", "--repository", str(repo),
           "--http-port", str(http), "--grpc-port", str(grpc_port), *args]
    if config is not None:
        cmd += ["--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("SPLITSERVE_TOKEN", None)
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, http, grpc_port


def wait_ready(proc: subprocess.Popen, http: int, timeout: float = 90) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server never became ready")


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- logs ------------------------------------------------------------------------------
class LogCapture(logging.Handler):
    """Records of one logger (and its children) while installed."""

    def __init__(self, logger: str):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in list(self.records)]

    def __enter__(self) -> LogCapture:
        self._old_level = self._logger.level
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._old_level)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")
