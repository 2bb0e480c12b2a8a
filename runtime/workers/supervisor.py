"""`splitserve serve --workers N`: N complete runtimes behind the same ports.

The supervisor never imports torch, gRPC or the web servers: it probes the ports (a taken
port fails at once, with one line), makes a private run folder for the workers' metrics
snapshots, and starts each worker with multiprocessing "spawn" (never fork: gRPC and CUDA
do not survive it). It restarts a worker that dies, with backoff, logging the reason;
forwards SIGTERM/SIGINT; and exits 0 once every worker drained and exited 0. Workers load
before they join the ports, and answer ready only once the supervisor has seen every one
of them serve (it writes ALL_READY into the run folder): the server is ready as a whole.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait

log = logging.getLogger("splitserve.supervisor")

BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
STABLE_S = 30.0  # a worker that lived this long restarts without backoff
MAX_AUTO = 32
ALL_READY = "all-workers-ready"  # the same name as runtime/workers/child.py's: every worker loaded


def auto_workers(cores: int, gpus: int) -> int:
    """`--workers auto`: one per core on CPU; on GPUs, each worker holds its own copy of
    every model, so at most 4 per device (and never more than the cores)."""
    n = cores if gpus == 0 else min(cores, 4 * gpus)
    return max(1, min(n, MAX_AUTO))


def count_gpus() -> int:
    """NVIDIA devices visible, without initialising CUDA in the supervisor."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([d for d in vis.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def probe_port(host: str, port: int, what: str) -> int:
    """Bind (without SO_REUSEPORT) to learn the port and fail at once when it is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return sock.getsockname()[1]
    except OSError as e:
        raise OSError(f"{what} port {host}:{port}: {e.strerror or e}") from None
    finally:
        sock.close()


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.proc = None
        self.conn = None
        self.started = 0.0
        self.failures = 0
        self.restart_at: float | None = None
        self.announced = False


class Supervisor:
    def __init__(self, settings, workers: int, log_format: str):
        self.settings = settings
        self.n = workers
        self.log_format = log_format
        self.ctx = mp.get_context("spawn")
        self.stopping = False
        self.slots = [_Slot(i) for i in range(workers)]
        self.all_announced = False  # every worker served once: later spawns are replacements

    def _spawn(self, slot: _Slot) -> None:
        r, w = self.ctx.Pipe(duplex=False)
        slot.proc = self.ctx.Process(
            target=_worker_entry, name=f"splitserve-worker-{slot.index}",
            args=(self.settings.to_wire(), slot.index, self.run_dir, self.http_port, self.grpc_port,
                  self.log_format, w, self.all_announced))  # once the others serve: load, then join
        slot.proc.start()
        w.close()
        slot.conn, slot.started, slot.restart_at, slot.announced = r, time.monotonic(), None, False
        log.info("event=worker_started worker=%d pid=%d", slot.index, slot.proc.pid)

    def _on_signal(self, signum, _frame) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("event=stopping reason=signal signal=%s workers=%d",
                     signal.Signals(signum).name, self.n)
            for s in self.slots:
                if s.proc is not None and s.proc.is_alive():
                    os.kill(s.proc.pid, signal.SIGTERM)

    def run(self) -> int:
        s = self.settings.server
        self.http_port = probe_port(s.host, s.http_port, "HTTP")
        self.grpc_port = probe_port(s.host, s.grpc_port, "gRPC")
        self.run_dir = tempfile.mkdtemp(prefix="splitserve-run-")  # 0700: ours only
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for slot in self.slots:
                self._spawn(slot)
            return self._loop()
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _loop(self) -> int:
        announced = False
        first_line = None
        status = 0
        deadline = None
        while True:
            live = [x for x in self.slots if x.proc is not None]
            if self.stopping:
                if deadline is None:
                    deadline = time.monotonic() + self.settings.server.drain_timeout_s + 30
                if not live:
                    log.info("event=stopped workers=%d status=%d", self.n, status)
                    return status
                if time.monotonic() > deadline:
                    for x in live:
                        log.error("event=worker_killed worker=%d pid=%d reason=drain_timeout",
                                  x.index, x.proc.pid)
                        x.proc.kill()
                    status, deadline = 1, float("inf")
            objs = [x.proc.sentinel for x in live] + [x.conn for x in live if not x.announced]
            ready = wait(objs, timeout=0.2) if objs else time.sleep(0.2) or []
            now = time.monotonic()
            for x in live:
                if x.conn in ready and not x.announced:
                    try:
                        msg = json.loads(x.conn.recv_bytes(1 << 16))
                    except (EOFError, OSError, ValueError):
                        continue
                    x.announced = True
                    x.failures = 0 if now - x.started > 0 else x.failures
                    first_line = first_line or msg.get("line")
                    log.info("event=worker_serving worker=%d pid=%d", x.index, x.proc.pid)
                if x.proc.sentinel in ready or not x.proc.is_alive():
                    x.proc.join(1)
                    code = x.proc.exitcode
                    reason = (f"signal={signal.Signals(-code).name}" if code is not None and code < 0
                              else f"exit={code}")
                    was_serving, lived = x.announced, now - x.started
                    x.proc, x.conn = None, None
                    if self.stopping:
                        log.info("event=worker_exited worker=%d %s", x.index, reason)
                        # one still starting had nothing to drain: SIGTERM's default is fine
                        if code != 0 and (was_serving or code != -signal.SIGTERM):
                            status = 1
                        continue
                    if not was_serving and code == 2:  # a usage/config error: never retry
                        log.error("event=worker_failed worker=%d %s reason=bad_config", x.index, reason)
                        self.stopping = True
                        status = 2
                        self._on_signal(signal.SIGTERM, None)
                        continue
                    x.failures = 0 if lived > STABLE_S else x.failures + 1
                    delay = 0.0 if x.failures == 0 else BACKOFF_S[min(x.failures, len(BACKOFF_S)) - 1]
                    x.restart_at = now + delay
                    log.warning("event=worker_died worker=%d %s lived_s=%.1f restart_in_s=%.1f",
                                x.index, reason, lived, delay)
            if not self.stopping:
                for x in self.slots:
                    if x.proc is None and x.restart_at is not None and now >= x.restart_at:
                        self._spawn(x)
                if not announced and all(x.announced for x in self.slots):
                    announced = self.all_announced = True
                    # the workers' readiness (no import of the child: it would pull in the server)
                    with open(os.path.join(self.run_dir, ALL_READY), "w", encoding="utf-8"):
                        pass
                    log.info("%s workers=%d", first_line or "event=serving", self.n)


def _worker_entry(*args) -> None:
    """Runs in the child only: the supervisor itself never imports the server."""
    from runtime.workers.child import main
    main(*args)


def serve(settings, workers: int, log_format: str) -> int:
    return Supervisor(settings, workers, log_format).run()
