"""`splitserve` command line. Arguments are parsed in main() only, never at import."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path("configs/splitserve.yaml")
KUBERNETES = "kubernetes://"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve", description="Serve versioned PyTorch models "
                                "with A/B splits over KServe v2 (REST, gRPC) and TF Serving REST.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model repository",
                       description="Watch a model repository and serve its versions.")
    s.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="model repository: <model>/<version>/ folders (default: ./model_repository)")
    s.add_argument("--config", default=None,
                   help="routing/server config YAML (default: ./configs/splitserve.yaml when present); "
                        "watched and hot-reloaded; API changes are persisted here. "
                        "kubernetes://NAMESPACE/CONFIGMAP keeps routing in a ConfigMap instead")
    s.add_argument("--host", default=None,
                   help="address to bind both servers to (default: 127.0.0.1, loopback only)")
    s.add_argument("--http-port", type=int, default=None, help="REST port (default 8000; 0 = any free)")
    s.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 8001; 0 = any free)")
    s.add_argument("--token", default=None,
                   help="bearer token required by state-changing endpoints (routing PUT, "
                        "load/unload); default: $SPLITSERVE_TOKEN, else none")
    s.add_argument("--polling", action="store_true",
                   help="poll the repository instead of using filesystem events (network file systems)")
    s.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    s.add_argument("--log-format", choices=("kv", "json"), default="kv",
                   help="one line per event: key=value (default) or JSON")
    return p


def build_settings(args: argparse.Namespace):
    from runtime.settings import Settings

    config = args.config
    source = None
    if config is not None and config.startswith(KUBERNETES):
        source, config = config, None
    elif config is not None:
        config = Path(config)
    elif DEFAULT_CONFIG.exists():
        config = DEFAULT_CONFIG
    data: dict = {}
    text = None
    if source is not None:  # the ConfigMap holds the server settings too
        from router import RoutingError
        from runtime.k8ssource import KubernetesSource
        try:
            text = KubernetesSource.from_url(source).read() or ""
        except RoutingError as e:
            raise SystemExit(f"splitserve: {e.message}") from None
    elif config is not None:
        if not config.exists():
            raise SystemExit(f"splitserve: config file {config} does not exist")
        text = config.read_text()
    if text is not None:
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise SystemExit(f"splitserve: config {source or config} is not valid YAML: "
                             f"{' '.join(str(e).split())}") from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"splitserve: {source or config}: expected a mapping at the top level")
        for section in ("server", "limits", "repository"):
            if section in loaded:
                data[section] = loaded[section]
        for key in ("log_level", "shadow_max_inflight"):
            if key in loaded:
                data[key] = loaded[key]
    settings = Settings.model_validate(data)
    srv = settings.server
    if args.host is not None:
        srv.host = args.host
    if args.http_port is not None:
        srv.http_port = args.http_port
    if args.grpc_port is not None:
        srv.grpc_port = args.grpc_port
    srv.token = args.token or os.environ.get("SPLITSERVE_TOKEN") or srv.token
    settings.repository.path = args.repository
    if args.polling:
        settings.repository.polling = True
    if args.log_level:
        settings.log_level = args.log_level
    settings.config_path = config
    settings.config_source = source
    return settings


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pydantic import ValidationError

    try:
        settings = build_settings(args)
    except ValidationError as e:
        print(f"splitserve: invalid settings: {e}", file=sys.stderr)
        return 2
    from runtime.logs import setup_logging
    setup_logging(settings.log_level, args.log_format)
    from runtime.server.app import Server

    if not Path(settings.repository.path).is_dir():
        print(f"splitserve: model repository {settings.repository.path} is not a directory",
              file=sys.stderr)
        return 2
    from router import RoutingError
    try:
        asyncio.run(Server(settings).serve_forever())
    except KeyboardInterrupt:
        pass
    except RoutingError as e:
        print(f"splitserve: config {settings.config_source or settings.config_path} rejected: "
              f"{e.message}", file=sys.stderr)
        return 2
    except TimeoutError as e:  # the start deadline passed (before OSError: it is one)
        print(f"splitserve: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the port is taken
        print(f"splitserve: {e.strerror or e}" if e.errno is not None else f"splitserve: {e}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
