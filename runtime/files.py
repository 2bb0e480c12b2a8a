"""Files several processes share (the workers' run folder, a fleet's lease and state
files): whole-file atomic writes and a bounded reader of the others' files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("splitserve.files")

MAX_SNAPSHOT_BYTES = 64 << 20  # a file larger than this is not ours: skipped


def write_json_atomic(path: Path, doc: dict) -> None:
    """Readers see the previous file or this one, never half of one (no fsync: a run
    folder lives one run)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(json.dumps(doc, separators=(",", ":")).encode())
    os.replace(tmp, path)


def read_peer_files(folder: Path, pattern: str, own: str, what: str) -> list[dict]:
    """The JSON objects in `folder` matching `pattern`, except our own file `own`: other
    workers' latest, dead incarnations' last. Too large or unreadable ones are skipped
    (`event=<what>_unreadable`)."""
    out = []
    for p in sorted(folder.glob(pattern)):
        if p.name == own:
            continue
        try:
            if p.stat().st_size > MAX_SNAPSHOT_BYTES:
                continue
            doc = json.loads(p.read_bytes())
        except (OSError, ValueError) as e:
            log.warning("event=%s_unreadable path=%s error=%r", what, p, e)
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out
