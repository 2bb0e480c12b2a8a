"""The default config file, ./configs/splitserve.yaml, made from a tracked template.

The checkout tracks configs/splitserve.example.yaml, never the file the server
writes: routing changes over the API are persisted into the config file, and a
tracked one would dirty the checkout (and `git pull` would fight the user's
routing). So when `splitserve serve` runs without --config where the default file
is missing but the template is there (a fresh clone), the template is copied to
the default path first, once; from then on that copy is the server's to rewrite.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DEFAULT_CONFIG = Path("configs/splitserve.yaml")
TEMPLATE = Path("configs/splitserve.example.yaml")


def seed_default_config(default: Path = DEFAULT_CONFIG, template: Path = TEMPLATE) -> bool:
    """Create `default` from `template` when only the template exists; True if it did.

    Create-if-absent is atomic (a hard link of a finished temporary copy), so two
    servers starting at once, or a file that appears meanwhile, are never overwritten.
    """
    if default.exists() or not template.is_file():
        return False
    tmp = default.with_name(f".{default.name}.seed.{os.getpid()}.tmp")
    shutil.copyfile(template, tmp)
    try:
        os.link(tmp, default)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True
