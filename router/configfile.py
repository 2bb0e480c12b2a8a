"""The routing config file (configs/splitserve.yaml): load, and persist atomically.

Format: a top-level mapping whose `models` key maps model -> route config object. Every
other top-level key (`server:` ...) belongs to someone else and is kept untouched.

Persisting re-reads the file, changes only what it must and writes the result atomically:
a temp file in the same folder, flush, fsync, os.replace, fsync of the folder. A reader,
or a crash, sees the old file or the new one, never a mix. The read-modify-write holds an
exclusive `flock` on `.<name>.lock` beside the file, so writers in other processes (the
workers of `--workers N`) take turns: each re-reads what the last one wrote and changes
only its own model's entry, so no PUT is lost. Read and written in the one YAML dialect
(router/yamltext.py, round trip): comments, key order and quoting survive.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from collections.abc import Mapping, MutableMapping
from typing import Any

from router import yamltext
from router.config import RouteConfig
from router.errors import RoutingError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process writes, as before
    fcntl = None  # type: ignore[assignment]

__all__ = ["load_config_file", "persist_config_file", "parse_config_text", "update_config_text"]


def _read(path: str, text: str) -> Any:
    try:
        return yamltext.load_rt(text)
    except yamltext.YamlError as e:
        raise RoutingError("invalid", f"{path}: not valid YAML: {e.reason}") from None


def parse_config_text(text: str, source: str = "<config>") -> dict[str, RouteConfig]:
    """Every model's RouteConfig from the YAML text; all faults in one RoutingError."""
    doc = _read(source, text)
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise RoutingError("invalid", f"{source}: expected a mapping at the top level, got {type(doc).__name__}")
    models = doc.get("models")
    if models is None:
        return {}
    if not isinstance(models, Mapping):
        raise RoutingError("invalid", f"{source}: models: expected a mapping of model -> routing config")
    out: dict[str, RouteConfig] = {}
    problems: list[str] = []
    for model, obj in models.items():
        if not (isinstance(model, str) and model):
            problems.append(f"models: model name {model!r} must be a non-empty string")
            continue
        try:
            out[model] = RouteConfig.from_json(obj, model=model)
        except RoutingError as e:
            problems.extend(f"models.{model}: {p}" for p in e.problems)
    if problems:
        raise RoutingError("invalid", f"{source}: " + "; ".join(problems), tuple(problems))
    return out


def load_config_file(path: str | os.PathLike[str], *, missing_ok: bool = False) -> dict[str, RouteConfig]:
    """Load and validate every model's routes.

    A missing file raises RoutingError("missing"), or gives {} with missing_ok=True (the
    runtime's default path may not exist yet; a path the user typed must). Any other fault,
    invalid YAML included, raises RoutingError("invalid") with the reason.
    """
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise RoutingError("missing", f"{p}: no such routing config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RoutingError("invalid", f"{p}: cannot read: {e}") from None
    return parse_config_text(text, p)


def persist_config_file(path: str | os.PathLike[str], model: str,
                        config: RouteConfig | None) -> tuple[bytes, bytes]:
    """Set (or, with None, remove) one model's entry and write the file atomically.

    Other models and top-level keys are left as they are (as they are NOW: re-read under
    the writers' lock). Returns (the bytes found under the lock, the bytes written): a
    watcher of the file can tell whether the write carried another process's changes it
    has not applied yet. Raises RoutingError("invalid") when the existing file cannot be
    parsed (it is never overwritten then).
    """

    return _update(os.fspath(path), _set_model(model, config))


def _yaml_obj(config: RouteConfig) -> dict[str, Any]:
    """The config as YAML wants it: version weight keys as plain ints (no quotes)."""
    obj = config.to_json()
    if "weights" in obj:
        obj["weights"] = dict(config.weights)
    return obj


def _merge(dst: MutableMapping[Any, Any], src: Mapping[Any, Any]) -> None:
    """Make dst equal src in place, so surviving keys keep their comments and order.

    Keys match by their text (a quoted "2" in the file is the same key as 2).
    """
    by_text = {str(k): k for k in dst}
    wanted = {str(k) for k in src}
    for k in [k for k in dst if str(k) not in wanted]:
        del dst[k]
    for k, v in src.items():
        old_key = by_text.get(str(k))
        if old_key is None:
            dst[k] = v
        elif isinstance(v, Mapping) and isinstance(dst[old_key], MutableMapping):
            _merge(dst[old_key], v)
        elif dst[old_key] != v or isinstance(dst[old_key], bool) != isinstance(v, bool):
            dst[old_key] = v


def _update(path: str, change: Any) -> tuple[bytes, bytes]:
    real = os.path.realpath(path)  # write through a symlink, do not replace the link
    with writers_lock(real):
        try:
            with open(real, "rb") as f:
                before = f.read()
        except FileNotFoundError:
            before = b""
        try:
            text = before.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RoutingError("invalid", f"{real}: not UTF-8 text ({e.reason} at byte "
                               f"{e.start}); not overwriting it") from None
        data = _changed_text(text, real, change).encode("utf-8")
        atomic_write(real, data)
    return before, data


@contextlib.contextmanager
def writers_lock(path: str) -> Iterator[None]:
    """An exclusive flock on `.<name>.lock` beside `path`, across processes.

    A file of its own, never the config itself: the atomic rename replaces the config's
    inode, so a lock on it would guard a file nobody reads any more. The lock file stays
    (deleting it would let two writers hold locks on different inodes)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    folder, name = os.path.split(path)
    fd = os.open(os.path.join(folder, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, also if we die holding it
        yield
    finally:
        os.close(fd)


def update_config_text(text: str, model: str, config: RouteConfig | None, source: str = "<config>") -> str:
    """`persist_config_file` on a document held elsewhere (a ConfigMap): the new text."""

    return _changed_text(text, source, _set_model(model, config))


def _set_model(model: str, config: RouteConfig | None):
    """The edit both writers make: set one model's entry (merged, comments kept) or drop it."""

    def change(models: MutableMapping[Any, Any]) -> None:
        if config is None:
            models.pop(model, None)
        elif model in models and isinstance(models[model], MutableMapping):
            _merge(models[model], _yaml_obj(config))
        else:
            models[model] = _yaml_obj(config)
    return change


def _changed_text(text: str, source: str, change: Any) -> str:
    doc = _read(source, text) if text.strip() else None
    if doc is None:
        doc = _new_map()
    if not isinstance(doc, MutableMapping):
        raise RoutingError("invalid", f"{source}: expected a mapping at the top level; not overwriting it")
    models = doc.get("models")
    if models is None:
        models = doc["models"] = _new_map()
    elif not isinstance(models, MutableMapping):
        raise RoutingError("invalid", f"{source}: models: expected a mapping; not overwriting it")
    change(models)
    return _dump(doc).decode("utf-8")


def _new_map() -> Any:
    from ruamel.yaml.comments import CommentedMap

    return CommentedMap()


def _dump(doc: Any) -> bytes:
    return yamltext.dump_rt(doc).encode("utf-8")


def atomic_write(path: str, data: bytes) -> None:
    """Replace `path` with `data` so that it is either wholly old or wholly new, durably."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644  # a new file; probing the umask would change it process-wide
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        dfd = os.open(folder, flags)
    except OSError:  # e.g. Windows cannot open a folder; the rename is done regardless
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
