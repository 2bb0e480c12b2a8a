"""Runtime settings: small nested pydantic models with secure defaults.

Built in `cli.main()` (never at import) from flags, environment and the `server:`
section of the config file.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_S):
    host: str = "127.0.0.1"  # loopback unless told otherwise
    http_port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    token: str | None = None  # when set, state-changing calls need `Bearer <token>`
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # After SIGTERM: readiness is 503 at once, but requests are served this long more, so
    # load balancers and Kubernetes endpoints stop sending before the listener closes.
    shutdown_delay_s: float = Field(default=0.0, ge=0, le=3600)
    start_timeout_s: float = Field(default=300.0, gt=0)  # one deadline for loading every model


class LimitSettings(_S):
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_elements: int = Field(default=16 * 1024 * 1024, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_inflight: int = Field(default=4096, ge=1)  # admitted requests across all models


class RepositorySettings(_S):
    path: Path = Path("model_repository")
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
    log_level: str = "INFO"
