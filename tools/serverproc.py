"""One harness for server child processes, shared by the tests and bench/.

`ServerProcess` starts `python -m runtime serve ...` on OS-chosen ports (`--http-port 0
--grpc-port 0`) and reads the bound ports from the server's own log line
`event=serving http=HOST:PORT grpc=HOST:PORT ...`, so no port is guessed and none can be
taken between a probe and the bind (`wait_listening()` reads them earlier, from the
`event=listening` line logged once both ports are bound and before any model loads: what
a Kubernetes probe sees). It waits for `/v2/health/ready`, stops the server
with SIGTERM (SIGKILL only after a timeout) and keeps its log: the last `keep_lines`
lines in memory (`log_text()`), and all of it in `log_path` when one is given.

`ChildProcess` is the same for any other server command (bench/'s baseline, which logs
the same line, and MLServer, which cannot bind port 0 and report it): started in its own
session, log drained by a thread (a child never blocks on a full pipe), stopped by
signalling its process group, reaped at interpreter exit.

Lives in tools/, not tests/: bench/ imports it too, and runtime/ never does.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"event=serving http=(\S+):(\d+) grpc=(\S+):(\d+|None)\b")
LISTENING = re.compile(r"event=listening http=(\S+):(\d+) grpc=(\S+):(\d+|None)\b")
_QUIET_LEVELS = {"WARNING", "WARN", "ERROR", "CRITICAL"}
_LIVE: "weakref.WeakSet[ChildProcess]" = weakref.WeakSet()


class ServerExited(RuntimeError):
    """The child ended (or never served) while we waited for it."""


def parse_serving(line: str) -> tuple[str, int, int | None] | None:
    """(host, http_port, grpc_port or None) from an `event=serving` log line (kv or JSON)."""
    text = line.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            if doc.get("event") == "serving" and isinstance(doc.get("http"), str):
                host, _, port = doc["http"].rpartition(":")
                g = str(doc.get("grpc") or "")
                gport = g.rpartition(":")[2]
                return host, int(port), int(gport) if gport.isdigit() else None
            text = " ".join(str(v) for v in doc.values())
    m = SERVING.search(text)
    if m is None:
        return None
    return m.group(1), int(m.group(2)), int(m.group(4)) if m.group(4).isdigit() else None


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of GET url, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Racy by nature: only for third-party servers
    that cannot bind port 0 and report it (MLServer); never for our own."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ChildProcess:
    """A server command as a child process, with its log kept and a clean stop."""

    def __init__(self, cmd: list[str], *, name: str = "server", cwd: Path | None = None,
                 env: Mapping[str, str | None] | None = None, log_path: Path | None = None,
                 keep_lines: int = 20_000):
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self._lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._eof = False
        self.host: str | None = None  # from the child's event=listening/serving line
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self.serving = False  # its event=serving line was seen
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
        self._file = open(log_path, "w", encoding="utf-8") if log_path is not None else None
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", bufsize=1,
                                     start_new_session=True)
        _LIVE.add(self)
        self._reader = threading.Thread(target=self._read, name=f"log {name}", daemon=True)
        self._reader.start()

    # ---- log ----------------------------------------------------------------------
    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:  # drained to the end
                with self._changed:
                    if self._file is not None and not self._file.closed:
                        self._file.write(line)
                        self._file.flush()
                    self._lines.append(line)
                    self._on_line(line)
                    self._changed.notify_all()
        finally:
            with self._changed:
                self._eof = True
                self._changed.notify_all()

    def _on_line(self, line: str) -> None:
        """Called with the lock held for each line: picks up the listening/serving ports."""
        if not self.serving and "serving" in line:
            got = parse_serving(line)
            if got is not None:
                self.host, self.http_port, self.grpc_port = got
                self.serving = True
        elif self.http_port is None and "event=listening" in line:
            m = LISTENING.search(line)
            if m is not None:
                self.host, self.http_port = m.group(1), int(m.group(2))
                self.grpc_port = int(m.group(4)) if m.group(4).isdigit() else None

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def log_text(self, last: int | None = None) -> str:
        lines = self.lines()
        return "".join(lines if last is None else lines[-last:])

    def wait_line(self, pattern: str | re.Pattern, timeout: float = 60.0) -> str:
        """The first log line matching `pattern` (seen so far or still to come)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        found: list[str] = []

        def seen() -> bool:
            found[:] = [ln for ln in self._lines if rx.search(ln)][:1]
            return bool(found)

        if not self._wait_for(seen, timeout):
            raise self._failure(f"no log line matching {rx.pattern!r}")
        return found[0]

    def _wait_for(self, pred, timeout: float) -> bool:
        """Wait (on the log's condition, no polling) until pred() holds or the log ends."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not pred():
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    return pred()
                self._changed.wait(left)
            return True

    def _failure(self, what: str) -> ServerExited:
        rc = self.proc.poll()
        if rc is None and self._eof:  # its log ended: it is exiting; let it be reaped
            try:
                rc = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        state = f"exited with {rc}" if rc is not None else "still running"
        return ServerExited(f"{self.name}: {what} ({state}); last log lines:\n{self.log_text(40)}")

    # ---- readiness ----------------------------------------------------------------
    def wait_http(self, url: str, timeout: float = 120.0, interval: float = 0.1) -> None:
        """Return once GET url answers 200; raise if the child exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._failure(f"exited before {url} answered 200")
            if http_status(url) == 200:
                return
            time.sleep(interval)  # polling a live child's endpoint: there is no event
        raise self._failure(f"{url} did not answer 200 within {timeout:.0f}s")

    @property
    def url(self) -> str:
        """http://HOST:PORT of the REST server (after wait_serving)."""
        if self.http_port is None:
            raise RuntimeError(f"{self.name} is not serving yet: call wait_serving() first")
        host = f"[{self.host}]" if ":" in (self.host or "") else self.host
        return f"http://{host}:{self.http_port}"

    @property
    def http_hostport(self) -> str:
        return self.url.removeprefix("http://")

    @property
    def grpc_target(self) -> str | None:
        if self.grpc_port is None:
            return None
        host = f"[{self.host}]" if ":" in (self.host or "") else self.host
        return f"{host}:{self.grpc_port}"

    def wait_serving(self, timeout: float = 180.0) -> ChildProcess:
        """Wait for the event=serving line (both servers listen, the repository has settled).
        Stops the child on failure."""
        return self._wait_ports(lambda: self.serving, "event=serving", timeout)

    def wait_listening(self, timeout: float = 120.0) -> ChildProcess:
        """Wait until the ports are known: the event=listening line (bound, models maybe
        still loading) or the event=serving line. Stops the child on failure."""
        return self._wait_ports(lambda: self.http_port is not None, "event=listening", timeout)

    def _wait_ports(self, pred, what: str, timeout: float) -> ChildProcess:
        if not self._wait_for(pred, timeout):
            err = self._failure(f"no {what} line")
            self.stop(10)
            raise err
        return self

    def wait_ready(self, timeout: float = 180.0) -> ChildProcess:
        """wait_serving, then /v2/health/ready answers 200. Stops the child on failure."""
        t0 = time.monotonic()
        self.wait_serving(timeout)
        try:
            self.wait_http(f"{self.url}/v2/health/ready", max(5.0, timeout - (time.monotonic() - t0)))
        except ServerExited:
            self.stop(10)
            raise
        return self

    # ---- stop ---------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the server process itself (not its group)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit; its log is then complete (lines(), log_text())."""
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> int:
        """SIGTERM the child's process group (our own session only), SIGKILL after
        `timeout`; returns the exit status. Idempotent."""
        if self.proc.poll() is None:
            self._signal_group(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(10)
        if self._file is not None and not self._file.closed:
            with self._lock:
                self._file.close()
        _LIVE.discard(self)
        return self.proc.returncode

    def kill(self) -> int:
        return self.stop(timeout=0.0, sig=signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the session we started for it, only
        except (ProcessLookupError, PermissionError):
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(ChildProcess):
    """`python -m runtime serve` as a child on ports 0; ports read from its log.

    ServerProcess(repo, "--token", "t", config=cfg).wait_ready() -> .url, .grpc_target
    `repository=None` runs it as a user in `cwd` does, on the default paths there.
    `config` is a path or a `kubernetes://NAMESPACE/NAME` source.
    """

    def __init__(self, repository: Path | None, *args: str, config: Path | str | None = None,
                 cwd: Path | None = None, env: Mapping[str, str | None] | None = None,
                 log_path: Path | None = None, name: str = "splitserve",
                 python: str = sys.executable, keep_lines: int = 20_000):
        args = list(args)
        level = _option(args, "--log-level")
        if level is not None and level.upper() in _QUIET_LEVELS:
            raise ValueError(f"--log-level {level} hides the event=serving line this harness "
                             f"reads the ports from; use INFO (the default) or DEBUG")
        if repository is None and cwd is None:
            raise ValueError("without a repository, give the cwd the server runs in")
        cmd = [python, "-m", "runtime", "serve", "--http-port", "0", "--grpc-port", "0"]
        if repository is not None:
            cmd += ["--repository", str(repository)]
        if config is not None:
            cmd += ["--config", str(config)]
        cmd += args
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        # No token from our own environment unless asked: it would silently guard the server.
        full_env: dict[str, str | None] = {"PYTHONPATH": pythonpath, "SPLITSERVE_TOKEN": None}
        full_env.update(env or {})
        # The repository's parent as the working directory: the project's own
        # configs/splitserve.yaml is never picked up by accident.
        super().__init__(cmd, name=name, cwd=cwd or Path(repository).resolve().parent,
                         env=full_env, log_path=log_path, keep_lines=keep_lines)


def _option(args: Iterable[str], flag: str) -> str | None:
    args = list(args)
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


@atexit.register
def _reap() -> None:
    """Children still running when the interpreter exits are killed, never left behind."""
    for child in list(_LIVE):
        try:
            child.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
