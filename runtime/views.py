"""Published views of the manager's state: frozen values every reader uses.

The manager builds a new `Snapshot` on every lifecycle change and hands it to its
subscribers (router table, metrics, metadata, control). Readers never see a `Harness` or
a `ModelEntry`: they read these values, so a reader cannot change serving state and a
test can build a snapshot by hand. The one live figure, in-flight requests, is read
through `Snapshot.inflight`, which asks the counters the handles keep.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from runtime.types import Signature, VersionState

S = VersionState


@dataclass(frozen=True, slots=True)
class VersionView:
    """One version of a model as serving sees it (the newest harness that matters)."""

    version: int
    state: VersionState
    error: str | None = None
    since: float = 0.0  # wall-clock seconds of the last state change
    signature: Signature | None = None  # of the loaded model (AVAILABLE/UNLOADING)
    format: str | None = None  # model.pt2, model.safetensors, model.pt
    device: str | None = None
    memory_bytes: int = 0  # of every loaded generation of this version
    folder_present: bool = True  # False: its folder is gone (it drains or has ended)
    execution: str | None = None  # inline | executor | batched, while it has a runner


@dataclass(frozen=True, slots=True)
class ModelView:
    name: str
    versions: tuple[VersionView, ...] = ()  # sorted by version; END ones included
    present: frozenset[int] = frozenset()  # numbered folders on disk
    declared: Signature | None = None  # from model.yaml, when it declares one
    spec_error: str | None = None  # model.yaml is invalid (last good spec kept, if any)
    disabled: bool = False  # unloaded through the repository API
    has_spec: bool = True  # False: no valid model.yaml was ever read
    platform_hint: str | None = None
    batching: Mapping | None = None  # dynamic batching settings when on (Triton config)
    max_batch_size: int = 0
    version_policy: object = None
    # numbered folders with no model file: version -> what was found and what is expected
    unloadable: Mapping[int, str] = field(default_factory=dict)

    @property
    def available(self) -> tuple[int, ...]:
        return tuple(v.version for v in self.versions if v.state is S.AVAILABLE)

    def config_error(self) -> str | None:
        """The model.yaml error as every surface shows it: while a last good model.yaml
        serves, said beside its versions; without one, its versions are FAILED with it."""
        if self.spec_error is None:
            return None
        if self.has_spec:
            return f"serving the last good model.yaml; the file now has an error: {self.spec_error}"
        return self.spec_error

    def version(self, v: int) -> VersionView | None:
        for x in self.versions:
            if x.version == v:
                return x
        return None

    def known(self, v: int) -> bool:
        return v in self.present or self.version(v) is not None

    def signature(self, v: int | None = None) -> tuple[Signature | None, int | None]:
        """That version's signature; else the newest AVAILABLE one's; else declared."""
        if v is not None:
            x = self.version(v)
            if x is not None and x.state is S.AVAILABLE:
                return x.signature, v
            return None, None
        avail = self.available
        if avail:
            return self.version(avail[-1]).signature, avail[-1]
        return self.declared, None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every model the manager knows, at one moment. `seq` grows with each publication."""

    seq: int = 0
    models: Mapping[str, ModelView] = field(default_factory=dict)
    _inflight: Callable[[str, int], int] = lambda m, v: 0
    abandoned_loads: int = 0  # timed-out loads whose thread still runs (and holds memory)

    def model(self, name: str) -> ModelView | None:
        return self.models.get(name)

    def names(self) -> list[str]:
        return sorted(self.models)

    def inflight(self, model: str, version: int) -> int:
        return self._inflight(model, version)


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """What metrics hears from the manager: "loaded", "failed" or "unloaded"."""

    kind: str
    model: str
    version: int
    error: str | None = None
    load_s: float | None = None
    warmup_s: float | None = None
    device: str | None = None
    memory_bytes: int = 0
    at: float = 0.0  # monotonic seconds


@dataclass(frozen=True, slots=True)
class ExperimentsView:
    """What the ExperimentRunner publishes for readers (metrics, the A/B summary).

    `reports`: model -> the GET .../experiment answer, for every model with an experiment
    block or a kept state. With several workers these show the deciding process's state
    (every worker shows the same), so a reader exports them as gauges from one process,
    never summed. `counts`: (kind, model, key) -> what this process did since it started
    (kind `rollbacks`, key the reason; kind `feedback`, key matched|unknown|duplicate):
    readers sum these across processes.
    """

    reports: Mapping[str, Mapping] = field(default_factory=dict)
    counts: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
