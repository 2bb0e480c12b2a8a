"""What the workers of one server (`--workers N`) share for experiments, through the
supervisor's private run folder, so that exactly one process decides on everyone's data.

- The decider is the worker holding an flock on `decider.lock`. The kernel releases it
  when its holder dies (kill -9 included), so another live worker takes it at its next
  tick. (Worker 0 by index would leave no decider while worker 0 waits out a restart
  backoff, and two for a moment if an old incarnation still drains.)
- Counters: each worker counts its routed requests into two memory-mapped tallies,
  `a<K>-<pid>.tally` (per model, version and routing share) and `k<K>-<pid>.tally` (per
  sticky key), before the response is sent (runtime/decider/tally.py, counts.py), so a
  worker killed with -9 loses none it acknowledged; a dead incarnation's files stay. The
  decider sums every file and judges the difference from the totals it judged last
  (`baseline.json`, so a new decider carries on where the old one stopped).
- Decision records: each served request of an experiment's model is appended at once
  (one O_APPEND write, before the response is sent) to `d<K>-<pid>-<seq>.log` as
  `request_id TAB model TAB version TAB arm TAB share TAB key` (the candidate share it was
  routed at; `=` and the sticky key, escaped, or -); a new segment every SEGMENT lines, the one
  before the last deleted (bounded disk). The decider reads every file into its one
  DecisionLog, so it alone joins feedback and matched/unknown/duplicate stay exact.
- Forwarding: the decider listens on `decider.sock`; another worker sends it a feedback
  body or an action (one JSON line each way), so each is applied once, by one process.
Plain JSON and text only: nothing read here is ever unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from runtime.decider import tally
from runtime.files import write_json_atomic

log = logging.getLogger("splitserve.experiments")

SEGMENT = 50_000  # decision records per file segment
MAX_LINE = 4 << 20  # a forwarded call (a feedback body is at most 1 MiB)
FORWARD_TIMEOUT_S = 10.0
_RECORDS = re.compile(r"^d(\d+)-(\d+)-(\d+)\.log$")


def _escape(key: str) -> str:
    return key.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append({"t": "\t", "n": "\n", "r": "\r"}.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


class Unanswered(Exception):
    """A forwarded call was sent but got no answer: it may have been applied (never resent)."""


class Peers:
    """One worker's side of the run folder (see the module docstring). Loop-only."""

    def __init__(self, run_dir: Path, worker: int):
        self.dir = Path(run_dir)
        self.worker = worker
        self.pid = os.getpid()
        self._lock_fd = os.open(self.dir / "decider.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self.leader = False
        self._server: asyncio.AbstractServer | None = None
        self._seq, self._lines, self._fd = 0, 0, -1
        self._offsets: dict[str, int] = {}  # records file -> bytes already read

    @property
    def sock(self) -> Path:
        return self.dir / "decider.sock"

    # ---- the decider --------------------------------------------------------------
    def try_lead(self) -> bool:
        """Take the decider lock if it is free (non-blocking); True while we hold it."""
        if not self.leader:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self.leader = True
        return True

    async def serve(self, handle: Callable[[dict], Awaitable[dict]]) -> None:
        """Listen for forwarded calls (only the lock holder: so no one else unlinks it)."""
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = await asyncio.wait_for(reader.readline(), FORWARD_TIMEOUT_S)
                answer = await handle(json.loads(line))
                writer.write(json.dumps(answer, allow_nan=False).encode() + b"\n")
                await writer.drain()
            except (OSError, ValueError, asyncio.TimeoutError) as e:
                log.warning("event=experiment_forward_failed side=decider error=%r", e)
            finally:
                writer.close()

        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        self._server = await asyncio.start_unix_server(on_conn, path=str(self.sock), limit=MAX_LINE)

    async def forward(self, call: dict) -> dict:
        """Send `call` to the decider. OSError when none listens (yet): safe to retry;
        Unanswered once it was sent."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.sock), limit=MAX_LINE), FORWARD_TIMEOUT_S)
        try:
            writer.write(json.dumps(call).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), FORWARD_TIMEOUT_S)
            answer = json.loads(line)
        except (OSError, ValueError, asyncio.TimeoutError) as e:
            raise Unanswered(f"the decider did not answer ({type(e).__name__})") from None
        finally:
            writer.close()
        if not isinstance(answer, dict):
            raise Unanswered("the decider's answer is not an object")
        return answer

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.sock.unlink()
            self._server = None
        os.close(self._lock_fd)  # releases the lock: another worker decides from its next tick
        self.leader = False
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ---- counters -----------------------------------------------------------------
    def tally_path(self, kind: str) -> Path:
        """This worker's tally file: kind "a" (arms) or "k" (sticky keys)."""
        return self.dir / f"{kind}{self.worker}-{self.pid}.tally"

    def peer_tallies(self, kind: str) -> list[dict[str, list[float]]]:
        """Every other worker's tally of `kind` (live workers' now, dead incarnations' last)."""
        own = self.tally_path(kind).name
        return [tally.read(p) for p in sorted(self.dir.glob(f"{kind}*.tally")) if p.name != own]

    def read_baseline(self) -> dict:
        try:
            doc = json.loads((self.dir / "baseline.json").read_bytes())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def write_baseline(self, doc: dict) -> None:
        write_json_atomic(self.dir / "baseline.json", doc)

    # ---- decision records -----------------------------------------------------------
    def _segment(self, seq: int) -> Path:
        return self.dir / f"d{self.worker}-{self.pid}-{seq}.log"

    def append_record(self, request_id: str, model: str, version: int, arm: str | None,
                      share: float | None = None, key: str | None = None) -> None:
        if "\t" in request_id or "\n" in request_id:
            return  # never joinable (feedback ids are printable), and it would break the line
        if self._fd < 0 or self._lines >= SEGMENT:
            if self._fd >= 0:
                os.close(self._fd)
                self._seq += 1
                with contextlib.suppress(FileNotFoundError):
                    self._segment(self._seq - 2).unlink()
            self._fd = os.open(self._segment(self._seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._lines = 0
        unit = "-" if key is None else "=" + _escape(key)
        os.write(self._fd, f"{request_id}\t{model}\t{version}\t{arm or '-'}\t{share!r}\t{unit}\n"
                 .encode("utf-8", "surrogateescape"))
        self._lines += 1

    def new_records(self) -> Iterator[tuple[str, str, int, str | None, float | None, str | None]]:
        """Records the other workers appended since the last call (complete lines only)."""
        names = {}
        for p in self.dir.glob("d*.log"):
            m = _RECORDS.match(p.name)
            if m and (int(m.group(1)), int(m.group(2))) != (self.worker, self.pid):
                names[p.name] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        self._offsets = {n: o for n, o in self._offsets.items() if n in names}
        for name in sorted(names, key=names.get):
            at = self._offsets.get(name, 0)
            try:
                with open(self.dir / name, "rb") as f:
                    f.seek(at)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            self._offsets[name] = at + end
            for line in data[:end].decode("utf-8", "surrogateescape").split("\n"):
                parts = line.split("\t")
                if len(parts) in (4, 6) and parts[2].isdigit():
                    share = key = None
                    if len(parts) == 6:
                        share = None if parts[4] == "None" else float(parts[4])
                        key = _unescape(parts[5][1:]) if parts[5].startswith("=") else None
                    yield parts[0], parts[1], int(parts[2]), None if parts[3] == "-" else parts[3], share, key
