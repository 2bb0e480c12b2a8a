"""experiments/ is a pure library: importing it loads no runtime, torch or server framework."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"runtime", "torch", "fastapi", "grpc", "starlette", "uvicorn"}


def test_importing_experiments_loads_nothing_forbidden():
    code = ("import sys, experiments, experiments.feedback, experiments.report; "
            "print(' '.join(sorted(m for m in sys.modules if '.' not in m)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert not FORBIDDEN & set(out.split())
