"""Imports go one way. A module reaching the wrong way fails here."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WEB = {"fastapi", "starlette", "uvicorn", "grpc", "grpc_health", "grpc_reflection"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def modules(pkg: str):
    for p in sorted((ROOT / pkg).rglob("*.py")):
        yield p.relative_to(ROOT), imports_of(p)


def test_router_is_a_pure_library():
    for rel, imps in modules("router"):
        bad = {i for i in imps if i.split(".")[0] in {"runtime", "torch"} | WEB}
        assert not bad, f"{rel} imports {bad}: router/ must not import runtime, torch or servers"


def test_experiments_is_a_pure_library():
    for rel, imps in modules("experiments"):
        bad = {i for i in imps if i.split(".")[0] in {"runtime", "torch"} | WEB}
        assert not bad, f"{rel} imports {bad}: experiments/ must not import runtime, torch or servers"


def test_router_does_not_import_experiments():
    for rel, imps in modules("router"):
        bad = {i for i in imps if i.split(".")[0] == "experiments"}
        assert not bad, f"{rel} imports {bad}: experiments/ builds on router/, never the other way"


def test_only_server_package_imports_web_frameworks():
    for rel, imps in modules("runtime"):
        if rel.parts[:2] == ("runtime", "server") or rel.parts[:3] == ("runtime", "protocol", "pb"):
            continue
        bad = {i for i in imps if i.split(".")[0] in WEB}
        assert not bad, f"{rel} imports {bad}: only runtime/server may import web/gRPC frameworks"


def test_core_does_not_import_protocols_or_servers():
    core = {"types", "errors", "dtypes", "modelspec", "policy", "repository", "loader", "manager",
            "batcher", "metrics", "inference", "control", "core", "metadata", "watch", "settings"}
    for rel, imps in modules("runtime"):
        if len(rel.parts) == 2 and rel.stem in core:
            bad = {i for i in imps if i.startswith(("runtime.protocol", "runtime.server"))}
            assert not bad, f"{rel} imports {bad}: the core must not know the protocols"


def test_codecs_do_not_import_servers():
    for rel, imps in modules("runtime/protocol"):
        bad = {i for i in imps if i.startswith("runtime.server") or i.split(".")[0] in {"fastapi", "starlette", "uvicorn"}}
        assert not bad, f"{rel} imports {bad}: codecs are wire <-> types only"


def test_types_have_no_torch():
    assert "torch" not in {i.split(".")[0] for i in imports_of(ROOT / "runtime" / "types.py")}


def test_nothing_is_importable_as_proto():
    assert not (ROOT / "proto" / "__init__.py").exists()
    assert not list((ROOT / "proto").glob("*.py"))


def test_distribution_declares_exactly_our_packages():
    import tomllib
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for pkg in ("runtime", "router", "experiments")
             for p in (ROOT / pkg).rglob("__init__.py")}
    assert declared == found


MANAGER_INTERNALS = {"harnesses", "serving", "ended", "loaded", "batch_calibration", "runner",
                     "generation", "state_since"}


def test_only_the_manager_touches_harnesses_and_entries():
    """Readers use the published views (runtime/views.py), never the manager's insides."""
    for rel, _ in modules("runtime"):
        if rel.as_posix() in ("runtime/manager.py", "runtime/runner.py"):
            continue
        tree = ast.parse((ROOT / rel).read_text(), str(rel))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "runtime.manager":
                bad = {a.name for a in node.names} & {"Harness", "ModelEntry", "VersionStatus"}
                assert not bad, f"{rel} imports {bad} from runtime.manager: use runtime.views"
            if isinstance(node, ast.Attribute):
                assert node.attr not in MANAGER_INTERNALS, \
                    f"{rel}:{node.lineno} reads .{node.attr}: manager internals; use a view"
                if node.attr == "models" and isinstance(node.value, ast.Attribute) \
                        and node.value.attr == "manager":
                    raise AssertionError(f"{rel}:{node.lineno} reads manager.models: use manager.view()")



def test_bench_does_not_import_tests():
    for p in sorted((ROOT / "bench").rglob("*.py")):
        imps = imports_of(p)
        bad = {i for i in imps if i.split(".")[0] in {"tests", "conftest", "reliability_helpers"}}
        assert not bad, f"{p.relative_to(ROOT)} imports {bad}: shared harnesses live in tools/"
