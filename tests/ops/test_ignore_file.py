"""What the server writes beside its config stays out of `git status`: its own copy of the
config and the experiments' state file (README, "A complete A/B session")."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["configs/splitserve.yaml", "configs/splitserve.experiments.json"])
def test_runtime_written_files_are_ignored(path):
    r = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.returncode == 0, f"{path} is not git-ignored"
