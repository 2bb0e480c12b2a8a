"""router/ is a pure library: stdlib and YAML only, never the runtime or heavy frameworks."""

import ast
import sys
from pathlib import Path

from conftest import loaded_packages

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_THIRD_PARTY = {"yaml", "ruamel"}
FORBIDDEN = {"runtime", "torch", "fastapi", "grpc", "starlette", "uvicorn", "numpy"}


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_router_imports_only_stdlib_and_yaml():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in sorted((ROOT / "router").glob("*.py")):
        for name in _imports(path):
            assert name in stdlib | ALLOWED_THIRD_PARTY | {"router"}, f"{path.name} imports {name}"


def test_importing_router_loads_nothing_forbidden():
    assert not FORBIDDEN & loaded_packages("router")
