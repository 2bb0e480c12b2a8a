"""Runtime settings: small nested pydantic models with secure defaults.

Built in `cli.main()` (never at import) from the config file's settings sections, then
flags and environment on top. While serving, `FileSettings.reload()` compares a new
config file with the one last read (`compare_settings`, pure): keys in `LIVE` are applied
in place (every reader holds these same objects), the others are logged at WARNING as
needing a restart, and keys a flag overrides are reported as such.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

log = logging.getLogger("splitserve.settings")

# The parts of the config file that are settings (the rest, `models:`, is routing).
FILE_SECTIONS = ("server", "limits", "repository")
FILE_KEYS = ("log_level", "shadow_max_inflight")
SECRET_KEYS = frozenset({"server.token"})  # never logged

_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}\Z")
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
AccessLogMode = Literal["off", "sample", "all"]
LoopName = Literal["auto", "uvloop", "asyncio"]
HttpName = Literal["auto", "httptools", "h11"]


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrpcLimits(_S):
    """Bounds of the gRPC front door (runtime/server/grpc/h2conn.py; the grpcio transport
    takes the ones it has an option for). Each turns a known HTTP/2 attack (issue 25,
    README "Security defaults") into a closed connection or a refused stream."""
    max_connections: int = Field(default=1024, ge=1)  # per worker process; more are refused
    max_streams: int = Field(default=256, ge=1, le=1 << 20)  # concurrent, per connection
    max_header_list_bytes: int = Field(default=16_384, ge=1024, le=1 << 20)  # request metadata
    preface_s: float = Field(default=10.0, gt=0)  # to send the HTTP/2 preface
    idle_s: float = Field(default=300.0, gt=0)  # a connection with no stream open this long: GOAWAY
    body_s: float = Field(default=30.0, gt=0)  # a unary request's body must arrive within this
    window_s: float = Field(default=30.0, gt=0)  # an answer waits this long for the peer's window
    max_age_s: float = Field(default=3600.0, ge=0)  # then a graceful GOAWAY (+-10%); 0 = forever
    max_age_grace_s: float = Field(default=30.0, ge=0)  # for streams in flight after it
    write_buffer_bytes: int = Field(default=1 << 22, ge=65_536)  # above it, reading pauses
    # Frames that cost the server more than the client, per connection per `flood_window_s`;
    # over any budget -> GOAWAY ENHANCE_YOUR_CALM and close.
    flood_window_s: float = Field(default=10.0, gt=0)
    max_pings: int = Field(default=1000, ge=1)
    max_settings: int = Field(default=100, ge=1)
    max_priority: int = Field(default=1000, ge=1)
    max_empty_frames: int = Field(default=1000, ge=1)  # DATA / CONTINUATION with no payload
    max_resets: int = Field(default=1000, ge=1)  # RST_STREAM received or provoked


class ServerSettings(_S):
    host: str = "127.0.0.1"  # loopback unless told otherwise
    http_port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    # when set, state-changing calls need `Bearer <token>`; visible ASCII, as HTTP headers carry it
    token: str | None = None
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # REST access log: off; sample (every 4xx/5xx, capped per second, plus this fraction of
    # the rest); all (every request).
    access_log: AccessLogMode = "sample"
    access_log_sample: float = Field(default=0.01, ge=0, le=1)
    # The event loop and HTTP parser (runtime/server/loops.py): auto = the fastest installed.
    loop: LoopName = "auto"
    http: HttpName = "auto"
    # gRPC transport: h2 = splitserve's own HTTP/2 on the event loop (runtime/server/grpc/h2.py);
    # grpcio = grpc.aio on the event loop.
    grpc_transport: Literal["h2", "grpcio"] = "h2"
    # Gone: gRPC on grpcio's own threads measured slower than both transports above
    # (docs/architecture.md). Still accepted so old config files start; a value > 0 logs once.
    grpc_threads: int = Field(default=0, ge=0, le=1024)
    grpc_limits: GrpcLimits = GrpcLimits()
    # Replicas of a kubernetes:// routing source: the experiment decider holds a Lease this
    # long (renewed every third of it; a dead holder is replaced after it), and the other
    # replicas reach it at advertise_url (default http://$POD_IP:<http port>, else the bound address).
    experiment_lease_s: float = Field(default=15.0, ge=1, le=3600)
    advertise_url: str | None = None

    @field_validator("advertise_url")
    @classmethod
    def _advertise(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"http://[^/\s?#]+", v):
            raise ValueError("expected http://HOST:PORT (no path), where the other replicas reach this one")
        return v


    @field_validator("token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        if v is not None and not _TOKEN.match(v):
            raise ValueError("a token is 1 to 4096 visible ASCII characters (no spaces), "
                             "as an Authorization header carries it")
        return v
    # After SIGTERM: readiness is 503 at once, but requests are served this long more, so
    # load balancers and Kubernetes endpoints stop sending before the listener closes.
    shutdown_delay_s: float = Field(default=0.0, ge=0, le=3600)
    start_timeout_s: float = Field(default=300.0, gt=0)  # one deadline for loading every model


class LimitSettings(_S):
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_elements: int = Field(default=16 * 1024 * 1024, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_inflight: int = Field(default=4096, ge=1)  # admitted requests across all models


class StoreSettings(_S):
    """A repository on object storage (`repository.url`), mirrored into `cache_dir`."""
    poll_interval_s: float = Field(default=30.0, gt=0)  # listing period while nothing changes
    max_lists_per_minute: int = Field(default=12, ge=1)  # LIST requests in any 60 s window
    quiet_s: float = Field(default=5.0, ge=0)  # a changed listing must hold this long
    cache_dir: Path | None = None  # default: ~/.cache/splitserve/mirror/<url>-<hash>
    max_objects: int = Field(default=100_000, ge=1)  # a larger listing is refused
    max_object_bytes: int = Field(default=64 << 30, ge=1)
    list_timeout_s: float = Field(default=30.0, gt=0)
    fetch_timeout_s: float = Field(default=3600.0, gt=0)


class RepositorySettings(_S):
    path: Path = Path("model_repository")
    # s3://, gs://, az:// BUCKET/PREFIX: mirrored into store.cache_dir and served from there
    url: str | None = Field(default=None, pattern=r"^(s3|s3a|gs|az|azure|abfs|abfss)://[^/]+")
    store: StoreSettings = StoreSettings()
    quiet_s: float = Field(default=0.5, ge=0)  # debounce: a folder must be still this long
    incomplete_grace_s: float = Field(default=10.0, ge=0)  # then an incomplete folder fails
    polling: bool = False  # polling observer for network file systems
    poll_interval_s: float = Field(default=1.0, gt=0)
    load_workers: int = Field(default=1, ge=1, le=64)
    unload_drain_timeout_s: float = Field(default=30.0, ge=0)
    # A CPU model whose warm forward takes at most this long runs on the event loop:
    # the executor hop (thread wake-up + GIL hand-off) costs more than such a forward.
    inline_forward_us: float = Field(default=200.0, ge=0)
    intra_op_threads: int = Field(default=0, ge=0)  # per version executor; 0 = cores - 1


class Settings(_S):
    server: ServerSettings = ServerSettings()
    limits: LimitSettings = LimitSettings()
    repository: RepositorySettings = RepositorySettings()
    config_path: Path | None = None  # routing config (configs/splitserve.yaml)
    config_source: str | None = None  # kubernetes://NAMESPACE/CONFIGMAP instead of a file
    shadow_max_inflight: int = Field(default=64, ge=0)
    log_level: LogLevel = "INFO"
    # Set by the CLI: the settings the config file alone gave, and key -> flag for the
    # keys a flag or the environment overrode. Compared on a config-file reload.
    _file: Settings | None = PrivateAttr(default=None)
    _flags: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    def to_wire(self) -> str:
        """JSON a worker process rebuilds these exact settings from (`from_wire`): the
        supervisor parsed argv, the config file and the token file once; no child reads
        them again, and nothing is unpickled."""
        return json.dumps({"settings": self.model_dump(mode="json"),
                           "file": None if self._file is None else self._file.model_dump(mode="json"),
                           "flags": self._flags})

    @classmethod
    def from_wire(cls, text: str) -> Settings:
        doc = json.loads(text)
        s = cls.model_validate(doc["settings"])
        s._file = None if doc["file"] is None else cls.model_validate(doc["file"])
        s._flags = dict(doc["flags"])
        return s


# ---- what a config-file edit can change while serving ------------------------------------
# Read per request from the one shared object, so an in-place change takes effect at once.
LIVE = frozenset({"limits.max_inflight", "limits.request_timeout_s", "log_level",
                  "server.access_log", "server.access_log_sample"})
# REST reads these per request; the gRPC server took them at start (message size option).
LIVE_REST_ONLY = frozenset({"limits.max_body_bytes", "limits.max_elements"})


@dataclass(frozen=True, slots=True)
class SettingChange:
    key: str           # dotted: "limits.max_inflight"
    old: object
    new: object
    how: str           # "live" | "live_rest" (gRPC at restart) | "restart" | "flag"
    flag: str | None = None  # the flag or variable that wins over the file, for "flag"


def flatten(s: Settings) -> dict[str, object]:
    """The file-settable keys of `s`, dotted, as plain values."""
    out: dict[str, object] = {}
    for section in FILE_SECTIONS:
        for k, v in getattr(s, section).model_dump().items():
            out[f"{section}.{k}"] = str(v) if isinstance(v, Path) else v
    for k in FILE_KEYS:
        out[k] = getattr(s, k)
    return out


def compare_settings(old: Settings, new: Settings, flags: dict[str, str] | None = None) -> list[SettingChange]:
    """What changed between two readings of the config file, and how each change applies."""
    flags = flags or {}
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(a):
        if a[key] == b[key]:
            continue
        if key in flags:
            how = "flag"
        elif key in LIVE:
            how = "live"
        elif key in LIVE_REST_ONLY:
            how = "live_rest"
        else:
            how = "restart"
        out.append(SettingChange(key, a[key], b[key], how, flags.get(key)))
    return out


def settings_part(doc: dict) -> dict:
    """The settings sections and keys of a parsed config file."""
    return {k: doc[k] for k in (*FILE_SECTIONS, *FILE_KEYS) if k in doc}


def describe(e: ValidationError, flags: dict[str, str] | None = None) -> str:
    """A pydantic error as one line: `server.http_port: Input should be ... (got 70000)`."""
    flags = flags or {}
    parts = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        where = flags.get(key) or key or "settings"
        got = "" if err["type"] in ("missing", "extra_forbidden") or key in SECRET_KEYS \
            else f" (got {err.get('input')!r})"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}{got}")
    return "; ".join(parts)


def _shown(key: str, v: object) -> object:
    return "***" if key in SECRET_KEYS and v is not None else v


def apply_change(live: Settings, c: SettingChange) -> None:
    """Set one LIVE / LIVE_REST_ONLY key on the shared settings object, in place."""
    obj, _, attr = c.key.rpartition(".")
    setattr(getattr(live, obj) if obj else live, attr, c.new)
    if c.key == "log_level":
        from runtime.logs import set_level
        set_level(str(c.new))


class FileSettings:
    """The config file's settings as last read, for one live Settings object. Loop only."""

    def __init__(self, live: Settings):
        self.live = live
        self.path = live.config_path
        self.baseline = live._file if live._file is not None else self._read()

    def _read(self, text: str | None = None) -> Settings | None:
        from router import yamltext
        if text is None and self.path is None:
            return None
        try:
            doc = yamltext.load(text if text is not None else Path(self.path).read_text()) or {}
            if not isinstance(doc, dict):
                raise ValueError("expected a mapping at the top level")
            return Settings.model_validate(settings_part(doc))
        except ValidationError as e:
            log.error("event=config_settings_rejected path=%s keeping=last_good reason=%r",
                      self.path, describe(e))
        except (OSError, ValueError) as e:  # YamlError is a ValueError
            # the routing reload reports an unreadable file; this is the detail
            log.debug("event=config_settings_unreadable path=%s error=%r", self.path, str(e))
        return None

    def reload(self, text: str | None = None) -> list[SettingChange]:
        """Compare the document (`text` as the config source read it, else the file) with
        the last good reading; apply live keys; log every change."""
        new = self._read(text)
        if new is None:
            return []
        if self.baseline is None:
            self.baseline = new
            return []
        changes = compare_settings(self.baseline, new, self.live._flags)
        self.baseline = new
        for c in changes:
            old, val = _shown(c.key, c.old), _shown(c.key, c.new)
            if c.how == "flag":
                log.info("event=setting_overridden key=%s file_value=%r by=%s", c.key, val, c.flag)
                continue
            if c.how == "restart":
                log.warning("event=setting_needs_restart key=%s old=%r new=%r path=%s",
                            c.key, old, val, self.path)
                continue
            apply_change(self.live, c)
            if c.how == "live":
                log.info("event=setting_applied key=%s old=%r new=%r", c.key, old, val)
            else:
                log.warning("event=setting_applied key=%s old=%r new=%r applies_to=rest "
                            "grpc=restart_needed", c.key, old, val)
        return changes
