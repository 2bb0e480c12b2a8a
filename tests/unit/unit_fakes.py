"""Fakes for the unit tier: a loader that needs no model file, a repository of version
folders with valid-looking archives, a clock. Nothing here binds a socket or spawns."""

from __future__ import annotations

import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.lifecycle.loader import LoadedModel, LoadError
from runtime.types import Signature, TensorSpec

SIG = Signature((TensorSpec("x", "FP32", (-1,)),), (TensorSpec("y", "FP32", (-1,)),))


def write_version(root: Path, model: str, version: int, payload: bytes = b"weights") -> Path:
    """<root>/<model>/<version>/model.pt2, a complete archive (the scan checks that much).
    A different payload is a different size: new files, a new fingerprint."""
    d = root / model / str(version)
    d.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(d / "model.pt2", "w") as z:
        z.writestr("weights", payload)
    return d


@dataclass
class FakeModel(LoadedModel):
    """Answers x + version; remembers whether the manager gave it back."""

    released: bool = field(default=False)

    def release(self) -> None:
        self.released = True
        self.module = None


class FakeLoader:
    """The manager's `load` collaborator. `fail[v] = reason`: that version's loads raise
    LoadError; `gates[v]`: its loads wait for that event (a load in progress, held).
    `timeline` (shared with the test's event recorder) gets ("load", v, models still
    held) when a load starts."""

    def __init__(self, timeline: list | None = None):
        self.timeline = timeline if timeline is not None else []
        self.calls: list[int] = []
        self.fail: dict[int, str] = {}
        self.gates: dict[int, threading.Event] = {}
        self.models: list[FakeModel] = []

    def held(self) -> int:
        return sum(not m.released for m in self.models)

    def __call__(self, folder, spec) -> FakeModel:  # on a load thread
        v = folder.version
        self.calls.append(v)
        self.timeline.append(("load", v, self.held()))
        gate = self.gates.get(v)
        if gate is not None and not gate.wait(30):
            raise LoadError("test gate never opened")
        if v in self.fail:
            raise LoadError(self.fail[v])
        lm = FakeModel(module=lambda x: x + v, device=torch.device("cpu"), signature=SIG,
                       format="model.pt2", memory_bytes=1000 * v, load_s=0.01)
        self.models.append(lm)
        return lm
