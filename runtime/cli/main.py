"""`splitserve` command line. Arguments are parsed in main() only, never at import.

Precedence: a flag (or $SPLITSERVE_TOKEN for the token) over the config file's
`server:` / `limits:` / `repository:` sections over the defaults; only flags that were
given override. Every mistake is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import re
import stat
import sys
from pathlib import Path

from runtime.config.defaults import DEFAULT_CONFIG, TEMPLATE, seed_default_config

MAX_TOKEN_FILE_BYTES = 4096
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z")

log = logging.getLogger("splitserve.cli")


class CliError(Exception):
    """A mistake in what the user gave: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage block too: keep it to one line
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 65535, got {s!r}")
    return v


def _host(s: str) -> str:
    try:
        ipaddress.ip_address(s)
        return s
    except ValueError:
        pass
    if not _HOSTNAME.match(s):
        raise argparse.ArgumentTypeError(f"not an IP address or host name: {s!r}")
    return s


def _level(s: str) -> str:
    if s.upper() not in LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LEVELS)}, got {s!r}")
    return s.upper()

KUBERNETES = "kubernetes://"


def _workers(s: str) -> int | str:
    if s == "auto":
        return s
    try:
        v = int(s)
    except ValueError:
        v = 0
    if not 1 <= v <= 256:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to 256 or 'auto', got {s!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="splitserve", description="Serve versioned PyTorch models "
                "with A/B splits over KServe v2 (REST, gRPC) and TF Serving REST.")
    from runtime import __version__
    p.add_argument("--version", action="version", version=f"splitserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model repository",
                       description="Watch a model repository and serve its versions. A flag "
                                   "overrides the config file's value only when given.")
    s.add_argument("--repository", default=None,
                   help="model repository: <model>/<version>/ folders (default: the config's "
                        "repository.path, else ./model_repository), or s3://BUCKET/PREFIX, "
                        "gs://..., az://... (mirrored into a local cache)")
    s.add_argument("--config", default=None,
                   help="routing/server config YAML (default: ./configs/splitserve.yaml when present, "
                        "first copied from ./configs/splitserve.example.yaml when only that "
                        "exists); watched and hot-reloaded; API changes are persisted here. "
                        "kubernetes://NAMESPACE/CONFIGMAP keeps routing in a ConfigMap instead")
    s.add_argument("--host", type=_host, default=None,
                   help="address to bind both servers to (default: 127.0.0.1, loopback only)")
    s.add_argument("--http-port", type=_port, default=None, help="REST port (default 8000; 0 = any free)")
    s.add_argument("--grpc-port", type=_port, default=None, help="gRPC port (default 8001; 0 = any free)")
    tok = s.add_mutually_exclusive_group()
    tok.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                     help="file holding the bearer token required by state-changing endpoints "
                          "(routing PUT, load/unload); preferred: not visible in `ps`")
    tok.add_argument("--token", default=None,
                     help="the token itself (visible to every local user in `ps`: prefer "
                          "--token-file or $SPLITSERVE_TOKEN); default: $SPLITSERVE_TOKEN, "
                          "else server.token, else none")
    s.add_argument("--advertise-url", default=None, metavar="URL",
                   help="with --config kubernetes://...: where the other replicas reach this one "
                        "(http://HOST:PORT; default http://$POD_IP:<http port>, else the bound address)")
    s.add_argument("--polling", action="store_true",
                   help="poll the repository instead of using filesystem events (network file systems)")
    s.add_argument("--log-level", type=_level, default=None, metavar="LEVEL",
                   help="DEBUG, INFO (default), WARNING, ERROR, CRITICAL")
    s.add_argument("--log-format", choices=("kv", "json"), default="kv",
                   help="one line per event: key=value (default) or JSON")
    s.add_argument("--access-log", choices=("off", "sample", "all"), default=None,
                   help="REST access log: off, sample (default: every 4xx/5xx plus "
                        "server.access_log_sample of the rest), all")
    s.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default=None,
                   help="event loop (default auto: uvloop when installed, else asyncio)")
    s.add_argument("--http", choices=("auto", "httptools", "h11"), default=None,
                   help="HTTP/1.1 parser (default auto: httptools when installed, else h11)")
    s.add_argument("--grpc-transport", choices=("h2", "grpcio"), default=None,
                   help="gRPC server: h2 (default: splitserve's own HTTP/2 on the event loop) "
                        "or grpcio (grpc.aio)")
    s.add_argument("--grpc-threads", type=int, default=None, metavar="N",
                   help="ignored (the threaded gRPC server is gone; kept so old command lines start)")
    from runtime.cli.ops import add_subcommands  # status, route, publish, experiment (stdlib only)
    add_subcommands(sub)
    s.add_argument("--workers", type=_workers, default=1, metavar="N",
                   help="worker processes sharing the ports (default 1; 'auto': one per core, "
                        "at most 4 per GPU); each holds its own copy of every model")
    return p


def read_token_file(path: Path) -> tuple[str, list[str]]:
    """The token in `path` (surrounding whitespace stripped) and warnings about the file."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CliError(f"--token-file {path}: not a regular file")
        if st.st_size > MAX_TOKEN_FILE_BYTES:
            raise CliError(f"--token-file {path}: {st.st_size} bytes; a token file holds one "
                           f"token (at most {MAX_TOKEN_FILE_BYTES} bytes)")
        text = path.read_text(encoding="utf-8")
    except CliError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"--token-file {path}: {getattr(e, 'strerror', None) or e}") from None
    token = text.strip()
    if not token:
        raise CliError(f"--token-file {path}: the file is empty")
    warnings = []
    if st.st_mode & 0o007:
        warnings.append(f"event=token_file_readable path={path} mode={oct(st.st_mode & 0o777)} "
                        f"hint='chmod 600 (or 400) it: other local users can read it'")
    return token, warnings


def _load_config(path: Path) -> dict:
    if not path.exists():
        raise CliError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"config file {path}: {getattr(e, 'strerror', None) or e}") from None
    return _parse_config(text, path)


def _parse_config(text: str, path) -> dict:
    from router import yamltext
    try:
        doc = yamltext.load(text) or {}
    except yamltext.YamlError as e:
        where = f" line {e.line} column {e.column}" if e.line is not None else ""
        raise CliError(f"config file {path}:{where} is not valid YAML: {e.problem}") from None
    if not isinstance(doc, dict):
        raise CliError(f"config file {path}: expected a mapping at the top level")
    return doc


def build_settings(args: argparse.Namespace, env: dict | None = None, notes: list | None = None):
    """Settings from defaults, the config file, then the flags that were given.

    Raises CliError (one line) for anything invalid, naming the flag or the file key.
    Warnings for the log (a token on the command line, say) are appended to `notes`.
    """
    from pydantic import ValidationError

    from runtime.config.settings import Settings, describe, settings_part

    env = os.environ if env is None else env
    config = args.config
    source = None
    if config is not None and config.startswith(KUBERNETES):
        source, config = config, None
    elif config is not None:
        config = Path(config)
    elif DEFAULT_CONFIG.exists():
        config = DEFAULT_CONFIG
    if source is not None:  # the ConfigMap holds the server settings too
        from router import RoutingError
        from runtime.routing.k8s_source import KubernetesSource
        try:
            text = KubernetesSource.from_url(source).read() or ""
        except RoutingError as e:
            raise CliError(e.message) from None
        part = settings_part(_parse_config(text, source))
    else:
        part = settings_part(_load_config(config)) if config is not None else {}
    try:
        file_only = Settings.model_validate(part)
    except ValidationError as e:
        raise CliError(f"config file {config}: {describe(e)}") from None

    notes = [] if notes is None else notes
    given: dict[str, tuple[str, object]] = {}  # dotted key -> (flag, value)
    for key, flag, v in (("server.host", "--host", args.host),
                         ("server.http_port", "--http-port", args.http_port),
                         ("server.grpc_port", "--grpc-port", args.grpc_port),
                         ("server.access_log", "--access-log", args.access_log),
                         ("server.loop", "--loop", args.loop),
                         ("server.http", "--http", args.http),
                         ("server.grpc_transport", "--grpc-transport", args.grpc_transport),
                         ("server.grpc_threads", "--grpc-threads", args.grpc_threads),
                         ("server.advertise_url", "--advertise-url", args.advertise_url),
                         ("repository.polling", "--polling", True if args.polling else None),
                         ("log_level", "--log-level", args.log_level)):
        if v is not None:
            given[key] = (flag, v)
    if args.repository is not None:
        if "://" in args.repository:  # object storage: see runtime/repository/mirror.py
            from runtime.repository.objectstore import check_url
            try:
                given["repository.url"] = ("--repository", check_url(args.repository))
            except ValueError as e:
                raise CliError(str(e)) from None
        else:
            given["repository.path"] = ("--repository", Path(args.repository))
    if args.token_file is not None:
        token, warns = read_token_file(args.token_file)
        given["server.token"] = ("--token-file", token)
        notes += warns
    elif args.token is not None:
        given["server.token"] = ("--token", args.token)
        notes.append("event=token_on_command_line hint='--token is visible to local users in "
                     "ps; use --token-file PATH or $SPLITSERVE_TOKEN'")
    elif env.get("SPLITSERVE_TOKEN"):
        given["server.token"] = ("$SPLITSERVE_TOKEN", env["SPLITSERVE_TOKEN"].strip())

    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in part.items()}
    for key, (_flag, v) in given.items():
        section, _, attr = key.rpartition(".")
        if section:
            if not isinstance(data.get(section, {}), dict):
                raise CliError(f"config file {config}: {section}: expected a mapping")
            data.setdefault(section, {})[attr] = v
        else:
            data[attr] = v
    flags = {k: f for k, (f, _v) in given.items()}
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        raise CliError(describe(e, flags)) from None
    srv = settings.server
    if srv.http_port and srv.http_port == srv.grpc_port:
        raise CliError(f"the HTTP and gRPC ports are both {srv.http_port} "
                       f"({flags.get('server.http_port', 'server.http_port')}, "
                       f"{flags.get('server.grpc_port', 'server.grpc_port')})")
    settings.config_path = config
    settings._file = file_only
    settings._flags = flags
    settings.config_source = source
    return settings


def _check_paths(settings) -> None:
    if settings.repository.url:
        return  # mirrored into a local cache folder the mirror makes
    repo = Path(settings.repository.path)
    if not repo.is_dir():
        hint = "" if repo.exists() else " (does not exist)"
        raise CliError(f"model repository {repo} is not a directory{hint}")


def main(argv: list[str] | None = None) -> int:
    from runtime.server import loops
    args = _parser().parse_args(argv)
    if getattr(args, "ops", None) is not None:
        from runtime.cli.ops import run
        return run(args)
    notes: list[str] = []
    seeded = args.config is None and seed_default_config()
    try:
        settings = build_settings(args, notes=notes)
        _check_paths(settings)
        loops.check(settings.server.loop, settings.server.http)
    except (CliError, loops.NotInstalled) as e:
        print(f"splitserve: error: {e}", file=sys.stderr)
        return 2
    from runtime.logs import setup_logging
    setup_logging(settings.log_level, args.log_format)
    if settings.server.grpc_threads:
        notes.append("event=setting_ignored key=server.grpc_threads hint='the threaded gRPC "
                     f"server is gone; serving with grpc_transport={settings.server.grpc_transport}'")
    for note in notes:
        log.warning(note)
    s = settings.server
    # Before the heavy imports (torch) and the loads: the operator sees at once that it started.
    log.info("event=starting pid=%d repository=%s config=%s http=%s:%s grpc=%s:%s "
             "access_log=%s auth=%s loop=%s http_parser=%s", os.getpid(),
             settings.repository.url or Path(settings.repository.path).resolve(),  # s3:// as given
             settings.config_path, s.host,
             s.http_port, s.host, s.grpc_port, s.access_log, "token" if s.token else "none",
             loops.loop_name(s.loop), loops.http_name(s.http))
    if seeded:
        log.info("event=config_created path=%s from=%s", DEFAULT_CONFIG, TEMPLATE)
    workers = args.workers
    if workers == "auto":
        from runtime.workers.supervisor import auto_workers, count_gpus
        workers = auto_workers(len(os.sched_getaffinity(0)), count_gpus())
    if workers > 1:
        from runtime.workers.supervisor import serve
        try:
            return serve(settings, workers, args.log_format)
        except OSError as e:  # a taken port, found by the probe before any worker starts
            print(f"splitserve: error: {e}", file=sys.stderr)
            return 2
    from router import RoutingError
    from runtime.repository.objectstore import StoreError
    try:
        from runtime.server.app import Server  # inside: a protobuf VersionError is answered below
        loops.run(Server(settings).serve_forever(), s.loop)
    except KeyboardInterrupt:
        pass
    except RoutingError as e:
        print(f"splitserve: error: config {settings.config_source or settings.config_path} "
              f"rejected: {e.message}", file=sys.stderr)
        return 2
    except TimeoutError as e:  # the start deadline passed (before OSError: it is one)
        print(f"splitserve: error: {e}", file=sys.stderr)
        return 1
    except StoreError as e:  # the object-storage repository cannot be listed or cached
        print(f"splitserve: model repository: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the port is taken
        print(f"splitserve: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # protobuf's VersionError: a package's gencode is newer than it
        if type(e).__name__ != "VersionError":
            raise
        from google.protobuf import __version__ as pb_version
        print(f"splitserve: protobuf {pb_version} cannot load an installed package's generated"
              f" code ({' '.join(str(e).split()[:14])} ...): a later pip install changed"
              " protobuf under it; install splitserve and your other packages in one command,"
              " e.g. pip install -e . 'tritonclient[http,grpc]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
