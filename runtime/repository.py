"""Reads the model repository: which versions exist, whether each is complete, and its
fingerprint.

Layout: `<root>/<model>/<version>/` where `<version>` is a positive integer without
leading zeros; anything else (dot folders, `2.tmp`, `latest`, `007`) is ignored, so
"copy to a temp name, then rename" publishes atomically. Completeness is checked from
the files themselves (safetensors header vs file size, zip central directory), so a
half-copied folder is never handed to the loader while it is still changing.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime.modelspec import ModelSpec, SpecError, read_spec

VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
FORMATS = ("model.pt2", "model.safetensors", "model.pt")


@dataclass(frozen=True, slots=True)
class VersionFolder:
    version: int
    path: Path
    fingerprint: str  # file names, sizes, mtimes (+ model.py of the model, + spec)
    format: str | None  # which of FORMATS was found, None when none
    incomplete: str | None  # why the folder is not complete yet, None when complete
    newest_mtime: float  # wall-clock seconds of the newest file change


@dataclass(frozen=True, slots=True)
class ModelFolder:
    name: str
    path: Path
    spec: ModelSpec | None  # None when model.yaml is invalid (spec_error says why)
    spec_error: str | None
    versions: dict[int, VersionFolder]


def is_version_name(name: str) -> bool:
    return VERSION_RE.fullmatch(name) is not None


def is_model_name(name: str) -> bool:
    return MODEL_RE.fullmatch(name) is not None


def _stat_files(folder: Path) -> list[tuple[str, int, int]]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        try:
            if p.is_symlink() and not p.resolve().is_relative_to(folder.resolve().parent.parent):
                continue  # a symlink out of the repository is never followed
            if p.is_file():
                st = p.stat()
                out.append((str(rel), st.st_size, st.st_mtime_ns))
        except OSError:
            continue  # vanished while we looked: the next event rescans
    return out


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (None when its header matches its size)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name}: {size} bytes, shorter than the 8-byte header length"
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or 8 + n > size:
                return f"{path.name}: header of {n} bytes does not fit in a {size}-byte file"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{path.name}: unreadable header ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end != size:
        return f"{path.name}: truncated or padded: header describes {8 + n + end} bytes, file has {size}"
    return None


def zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{path.name}: not a complete archive ({e})"
    return None


def inside(path: Path, root: Path) -> bool:
    """True when `path` (symlinks resolved) lies under `root`: nothing outside the
    repository is ever read, imported or loaded."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def architecture_file(model_dir: Path, version_dir: Path) -> Path | None:
    """The model.py that builds this version (the loader refuses one outside the repository)."""
    for p in (version_dir / "model.py", model_dir / "model.py"):
        if p.is_file():
            return p
    return None


def scan_version(model_dir: Path, version: int, spec: ModelSpec | None) -> VersionFolder:
    vdir = model_dir / str(version)
    files = _stat_files(vdir)
    names = {f[0] for f in files}
    fmt = next((f for f in FORMATS if f in names), None)
    extra: list[tuple[str, int, int]] = []
    incomplete = None
    if fmt is None:
        incomplete = f"no model file yet (expected one of {', '.join(FORMATS)})"
    elif fmt == "model.safetensors":
        arch = architecture_file(model_dir, vdir)
        if arch is None:
            incomplete = "model.safetensors needs a model.py in the version or model folder"
        else:
            if arch.parent == model_dir:
                st = arch.stat()
                extra.append(("../model.py", st.st_size, st.st_mtime_ns))
            incomplete = safetensors_problem(vdir / fmt)
    else:
        incomplete = zip_problem(vdir / fmt)
    h = hashlib.blake2b(digest_size=12)
    h.update(repr(files + extra).encode())
    if spec is not None:
        h.update(spec.load_key().encode())  # in-place settings do not reload
    try:
        folder_mtime = vdir.stat().st_mtime_ns
    except OSError:
        folder_mtime = 0
    newest = max([f[2] for f in files + extra] + [folder_mtime]) / 1e9
    return VersionFolder(version, vdir, h.hexdigest(), fmt, incomplete, newest)


def scan_model(model_dir: Path, last_good: ModelSpec | None = None) -> ModelFolder:
    if model_dir.is_symlink():  # never follow a model folder out of (or around) the repository
        return ModelFolder(model_dir.name, model_dir, last_good, "model folder is a symlink: not followed", {})
    try:
        spec, err = read_spec(model_dir), None
    except SpecError as e:
        spec, err = last_good, str(e)
    versions = {}
    try:
        entries = list(model_dir.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        if is_version_name(entry.name) and entry.is_dir() and not entry.is_symlink():
            v = int(entry.name)
            versions[v] = scan_version(model_dir, v, spec)
    return ModelFolder(model_dir.name, model_dir, spec, err, versions)


def list_models(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir()
                      if p.is_dir() and not p.is_symlink() and is_model_name(p.name))
    except OSError:
        return []


def quiet_for(folder: VersionFolder) -> float:
    return time.time() - folder.newest_mtime
