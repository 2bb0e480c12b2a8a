"""The experiment decider of several servers sharing one writable routing config FILE:
the same interface the fleet uses from the Kubernetes Lease (runtime/decider/lease_k8s.py),
kept in files beside the config.

- Holder: the process holding `flock(LOCK_EX|LOCK_NB)` on `.<config name>.decider.lock`.
  The kernel frees it when the holder dies (kill -9 included), so another server takes
  over at its next sync, with no duration to wait out; while the holder lives no one
  else can take it, so there is never a second decider and no write needs a
  compare-and-swap (the same idea as experiment_peers.py's `decider.lock`, one level up).
- The record `.<config name>.decider.json` (holder identity, a version that grows with
  each write, the annotations: decider URL, judged baseline) is written atomically by
  the holder only; the others read it at every sync.
- The states annotation maps onto `<config stem>.experiments.json` (`{"models": {m:
  state}}`), where a lone server has always kept them, so an upgrade keeps them.
Needs a filesystem whose flock spans every server (one host, a local disk). Blocking:
called from a thread.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

from router.configfile import atomic_write
from runtime.files import write_json_atomic

RENEW_S = 0.5  # a sync reads two small files: a dead holder is replaced within this


class FileLease:
    budget = None  # a file has no size cap worth trimming decisions for
    renew_s = RENEW_S

    def __init__(self, config: Path, identity: str, states_key: str):
        config = Path(config)
        self.lock_path = config.with_name(f".{config.name}.decider.lock")
        self.record_path = config.with_name(f".{config.name}.decider.json")
        self.state_file = config.with_name(config.stem + ".experiments.json")
        self.identity, self.states_key = identity, states_key
        self.where = str(self.lock_path)
        self.title = f"the lock {self.lock_path}"
        self._fd: int | None = None  # opened at the first sync: never at import or in a parent
        self._held = False
        self._record: dict = {}
        self._states: str | None = None  # the states file's models, as JSON text
        self._lock = threading.Lock()

    @property
    def leading(self) -> bool:
        return self._held

    @property
    def holder(self) -> str | None:
        return self._record.get("holder") or None

    @property
    def version(self) -> int | None:
        return self._record.get("version")

    def annotations(self) -> dict[str, str]:
        out = dict(self._record.get("annotations") or {})
        if self._states is not None:
            out[self.states_key] = self._states
        return out

    def sync(self, annotations: dict[str, str] | None = None) -> bool:
        """Take the lock when free; read the record and the states; as holder, write what
        changed (`annotations` merged, the states into their file). True while we hold it."""
        with self._lock:
            if not self._held:
                if self._fd is None:
                    self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._held = True
                except BlockingIOError:
                    pass
            self._read()
            if self._held:
                self._write(annotations or {}, self.identity)
            return self._held

    def release(self, annotations: dict[str, str]) -> None:
        """Write the last state with no holder, then unlock: the next server takes it at once."""
        with self._lock:
            if self._held:
                self._write(annotations, None)
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor frees the lock
        self._fd, self._held = None, False

    def _read(self) -> None:
        try:
            doc = json.loads(self.record_path.read_bytes())
            self._record = doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            self._record = {}
        try:
            doc = json.loads(self.state_file.read_bytes())
            models = doc.get("models") if isinstance(doc, dict) else None
            self._states = None if models is None else json.dumps(models, separators=(",", ":"))
        except (OSError, ValueError):
            self._states = None

    def _write(self, annotations: dict[str, str], holder: str | None) -> None:
        states = annotations.get(self.states_key)
        rest = {k: v for k, v in annotations.items() if k != self.states_key}
        merged = {**(self._record.get("annotations") or {}), **rest}
        changed = states is not None and states != self._states
        if changed:  # the states first: a reader that sees the new version sees them too
            atomic_write(str(self.state_file), f'{{"models":{states}}}'.encode())
            self._states = states
        if changed or holder != self.holder or merged != self._record.get("annotations"):
            self._record = {"holder": holder, "version": int(self._record.get("version") or 0) + 1,
                            "annotations": merged}
            write_json_atomic(self.record_path, self._record)

