"""Reads the model repository: which versions exist, whether each is complete, and its
fingerprint.

Layout: `<root>/<model>/<version>/` where `<version>` is a positive integer without
leading zeros; anything else (dot folders, `2.tmp`, `latest`, `007`) is ignored, so
"copy to a temp name, then rename" publishes atomically. What is ignored is reported with
the reason (`ignored`, `root_ignored`: the manager logs each once), except hidden names
(`.3.tmp`, `__pycache__`), which publishing by rename uses all the time. Completeness is checked
from the files themselves (safetensors header vs file size, zip central directory), so a
half-copied folder is never handed to the loader while it is still changing.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime.repository.modelspec import SPEC_FILE, ModelSpec, SpecError, read_spec
from runtime.repository.triton import CONFIG_FILE, read_triton

VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
FORMATS = ("model.pt2", "model.safetensors", "model.pt")  # the first one present is loaded
EXPECTED_FILES = "model.pt2, model.safetensors (+ model.py), model.pt"
MODEL_FILES = ("model.yaml", "model.py", "config.pbtxt")  # beside the version folders
VERSION_EXTRAS = ("model.py", "warmup.json")  # read beside a version's model file
VERSION_NAMES = "version folders are named 1, 2, ..."

Ignored = tuple[tuple[str, str], ...]  # (path relative to the model folder, why), sorted


@dataclass(frozen=True, slots=True)
class VersionFolder:
    version: int
    path: Path
    fingerprint: str  # file names, sizes, mtimes (+ model.py of the model, + spec)
    format: str | None  # which of FORMATS was found, None when none
    incomplete: str | None  # why the folder is not complete yet, None when complete
    newest_mtime: float  # wall-clock seconds of the newest file change
    ignored: Ignored = ()  # entries beside the model file that nothing reads


@dataclass(frozen=True, slots=True)
class ModelFolder:
    name: str
    path: Path
    spec: ModelSpec | None  # None when model.yaml is invalid (spec_error says why)
    spec_error: str | None
    versions: dict[int, VersionFolder]
    ignored: Ignored = ()  # entries of the model folder and its versions that nothing reads


def is_version_name(name: str) -> bool:
    return VERSION_RE.fullmatch(name) is not None


def is_model_name(name: str) -> bool:
    return MODEL_RE.fullmatch(name) is not None


def is_hidden(name: str) -> bool:
    """Names publishing uses on the way (`.3.tmp`) or Python writes: never reported."""
    return name.startswith(".") or name == "__pycache__"


def ignored_reason(entry: Path) -> str | None:
    """Why the runtime ignores this entry of a model folder; None when it is used."""
    name = entry.name
    if is_version_name(name):
        if entry.is_symlink():
            return "a symlink: version folders are never followed through links"
        return None if entry.is_dir() else f"a file, not a folder: {VERSION_NAMES}"
    if entry.is_dir():
        leading = " without leading zeros, from 1" if name.isdigit() else ""
        return f"not a version number: {VERSION_NAMES}{leading}"
    if name in MODEL_FILES:
        return None
    if name in FORMATS:
        return f"a model file outside a version folder: move it into one (e.g. 1/{name})"
    close = difflib.get_close_matches(name, MODEL_FILES, n=1, cutoff=0.8)
    if close:
        return f"not a file the runtime reads; did you mean {close[0]!r}?"
    return ("not a file the runtime reads: a model folder holds model.yaml, model.py and "
            "version folders 1, 2, ...")


def _listing(names: list[str], limit: int = 5) -> str:
    if not names:
        return "nothing"
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def _stat_files(folder: Path, refused: list[str] | None = None) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of the files that count; `refused` collects the
    symlinks out of the repository, which never do."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(is_hidden(part) for part in rel.parts):
            continue
        try:
            if p.is_symlink() and not p.resolve().is_relative_to(folder.resolve().parent.parent):
                if refused is not None:
                    refused.append(str(rel))
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
    refused: list[str] = []
    files = _stat_files(vdir, refused)
    names = {f[0] for f in files}
    top = sorted({n.split("/", 1)[0] for n in names})
    fmt = next((f for f in FORMATS if f in names), None)
    extra: list[tuple[str, int, int]] = []
    incomplete = None
    ignored: list[tuple[str, str]] = []
    for name in top if fmt is not None else ():  # without one, the listing is the reason
        if name in FORMATS and name != fmt:
            ignored.append((f"{version}/{name}", f"not loaded: {fmt} is (the first of "
                                                 f"{', '.join(FORMATS)} present)"))
        elif name != fmt and name not in VERSION_EXTRAS:
            ignored.append((f"{version}/{name}", f"not read: a version folder holds "
                                                 f"{fmt}, model.py and warmup.json"))
    if fmt is None:
        found = _listing(top) + "".join(f" ({r}: a symlink out of the repository, not followed)"
                                        for r in refused[:2])
        incomplete = (f"no loadable file in {model_dir.name}/{version}/: found {found}; "
                      f"expected one of {EXPECTED_FILES}")
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
    return VersionFolder(version, vdir, h.hexdigest(), fmt, incomplete, newest, tuple(ignored))


def scan_model(model_dir: Path, last_good: ModelSpec | None = None) -> ModelFolder:
    if model_dir.is_symlink():  # never follow a model folder out of (or around) the repository
        return ModelFolder(model_dir.name, model_dir, last_good, None, {},
                           ((".", "a symlink: model folders are never followed through links"),))
    ignored: list[tuple[str, str]] = []
    try:
        if (model_dir / CONFIG_FILE).is_file() and not (model_dir / SPEC_FILE).exists():
            spec, notes = read_triton(model_dir)  # a Triton repository, as it is
            ignored.extend(notes)
        else:
            spec = read_spec(model_dir)
            if (model_dir / CONFIG_FILE).is_file():
                ignored.append((CONFIG_FILE, f"not read: {SPEC_FILE} describes this model"))
        err = None
    except SpecError as e:
        spec, err = last_good, str(e)
    versions = {}
    try:
        entries = list(model_dir.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        if is_hidden(entry.name):
            continue
        try:
            why = ignored_reason(entry)
        except OSError:
            continue  # vanished while we looked: the next event rescans
        if why is not None:
            ignored.append((entry.name, why))
        elif is_version_name(entry.name):
            v = int(entry.name)
            versions[v] = scan_version(model_dir, v, spec)
            ignored.extend(versions[v].ignored)
    return ModelFolder(model_dir.name, model_dir, spec, err, versions, tuple(sorted(ignored)))


MODEL_LAYOUT = "models are folders <root>/<model>/<version>/"
_TEMP_SUFFIXES = ("~", ".tmp", ".swp", ".part")  # editors and downloads on the way: silent


def root_ignored_reason(entry: Path) -> str | None:
    """Why an entry at the repository root is not a model; None for a model folder (and
    for a symlinked one, which its model scan reports) and for hidden or temporary names."""
    name = entry.name
    if is_hidden(name) or name.endswith(_TEMP_SUFFIXES):
        return None
    if entry.is_dir():
        if entry.is_symlink() or is_model_name(name):
            return None
        return (f"not a model name: {MODEL_LAYOUT}, a model named with letters, digits, "
                f"'_', '.' or '-' (starting with a letter or digit, at most 128)")
    if name in FORMATS:
        return f"a model file at the repository root: {MODEL_LAYOUT} (e.g. mymodel/1/{name})"
    if name in MODEL_FILES:
        return f"a model folder's file at the repository root: {MODEL_LAYOUT}, {name} in <model>/"
    return f"not a model folder: {MODEL_LAYOUT}"


def root_ignored(root: Path) -> Ignored:
    """What the repository root holds that is not a model folder, with why (sorted)."""
    out = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return ()
    for entry in entries:
        try:
            why = root_ignored_reason(entry)
        except OSError:
            continue  # vanished while we looked: the next event lists again
        if why is not None:
            out.append((entry.name, why))
    return tuple(sorted(out))


def list_models(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir()
                      if p.is_dir() and not p.is_symlink() and is_model_name(p.name))
    except OSError:
        return []


def quiet_for(folder: VersionFolder) -> float:
    return time.time() - folder.newest_mtime
