"""Shared helpers for the reliability scenarios (issue 7).

The root `tests/conftest.py` is loaded here by its path under its own module name, so
these tests do not depend on which `conftest` module happens to sit in `sys.modules`
(another directory's conftest.py may have taken that name first).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
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
import os, time, torch
from torch import nn
DELAY = {delay}
HOLD = {hold!r}
class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 8)
    def forward(self, input):
        while HOLD and os.path.exists(HOLD):  # a gate the test opens by deleting the file
            time.sleep(0.005)
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
                     extra_yaml: str = "batching: {enabled: false}",
                     hold: Path | None = None) -> Path:
    """A model whose forward sleeps `delay` seconds (Linear 64 -> 8); one executor thread
    per version, so concurrent requests queue behind each other (batching off unless
    `extra_yaml` says otherwise). While the file `hold` exists, every forward waits for
    its deletion first: a test holds requests in flight, checks, then lets them go."""
    m = repo / name
    m.mkdir(parents=True, exist_ok=True)
    (m / "model.py").write_text(SLOW_ARCH.format(delay=delay, hold=str(hold) if hold else None))
    (m / "model.yaml").write_text(SLOW_YAML.format(extra=extra_yaml))
    for v in versions:
        write_linear_weights(m / str(v), seed=v)
    return m


# ---- processes, the manager's passes, memory ------------------------------------------
# Child server processes: tools/serverproc.py (ports read from the server's log, SIGTERM stop).
from serverproc import ServerProcess  # noqa: E402,F401  (re-exported; tools/ is on sys.path via conftest)


def reconciles(srv: LiveServer, model: str) -> int:
    """Completed reconcile passes of `model` so far (read on the loop)."""
    return srv.on_loop(lambda: srv.core.manager.reconciles[model])


def wait_reconciled(srv: LiveServer, model: str, after: int, timeout: float = 30.0) -> bool:
    """True once a reconcile pass of `model` has completed since the count was `after` and
    the model has settled (nothing loading or unloading, no rescan due): the manager has
    looked at what changed and acted on it, so an "it did not load" check is not vacuous."""
    m = srv.core.manager

    async def run() -> bool:
        if not await m.wait_until(lambda: m.reconciles[model] > after, timeout):
            return False
        return await m.settle(model, timeout)

    return srv.call(run(), 2 * timeout + 5)


def watcher_barrier(srv: LiveServer, repo: Path, model: str = "mlp", *also: str,
                    timeout: float = 30.0) -> None:
    """Return once the watcher has delivered every filesystem event made before this call
    and the manager has acted on them: a harmless file written into `model`'s folder
    (events arrive in order, through one observer) triggers a reconcile of `model`; once
    that has completed and `model` and `also` have settled, any earlier event (also one
    the manager chose to ignore, such as a symlink out of the repository) is done with."""
    n = reconciles(srv, model)
    (repo / model / ".watch-barrier").write_text(str(n))
    assert wait_reconciled(srv, model, after=n, timeout=timeout), "the watcher never fired"
    for name in also:
        assert srv.call(srv.core.manager.settle(name, timeout), timeout + 5), f"{name} never settled"


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
