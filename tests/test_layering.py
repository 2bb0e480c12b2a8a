"""Imports go one way. A module reaching the wrong way fails here."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # starts no server process, binds no socket

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


def test_splitserve_is_the_face_on_top():
    """splitserve/ (version, client, `python -m splitserve`) may use runtime's top and cli;
    nothing below imports it back."""
    for pkg in ("runtime", "router", "experiments"):
        for rel, imps in modules(pkg):
            bad = {i for i in imps if i.split(".")[0] == "splitserve"}
            assert not bad, f"{rel} imports {bad}: nothing in {pkg}/ imports the splitserve face"
    for rel, imps in modules("splitserve"):
        bad = {i for i in imps if i.split(".")[0] == "runtime" and i not in ("runtime", "runtime.cli.main")}
        assert not bad, f"{rel} imports {bad}: splitserve/ uses only runtime's version and cli"
        bad = {i for i in imps if i.split(".")[0] in WEB}
        assert not bad, f"{rel} imports {bad}: the client needs no server frameworks"
        top = ast.parse((ROOT / rel).read_text()).body
        bad = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} \
            | {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert "torch" not in {i.split(".")[0] for i in bad}, \
            f"{rel} imports torch at import time: only Result.torch() may, when called"


def test_router_does_not_import_experiments():
    for rel, imps in modules("router"):
        bad = {i for i in imps if i.split(".")[0] == "experiments"}
        assert not bad, f"{rel} imports {bad}: experiments/ builds on router/, never the other way"


def test_only_server_package_imports_web_frameworks():
    for rel, imps in modules("runtime"):
        if rel.parts[:2] in (("runtime", "server"), ("runtime", "workers")) \
                or rel.parts[:3] == ("runtime", "protocol", "pb"):
            continue
        bad = {i for i in imps if i.split(".")[0] in WEB}
        assert not bad, f"{rel} imports {bad}: only runtime/server (and its workers) may import web/gRPC frameworks"


# ---- the folders: one concept each, imports go down this list only ----------------------
GROUND = {"types", "views", "errors", "dtypes", "logs", "files", "histogram", "tracing"}
LAYERS = ["config", "repository", "execution", "lifecycle", "routing", "metrics", "decider",
          "service", "jobs", "protocol", "server", "workers", "cli"]


def _home(name: str) -> str | None:
    """The folder (or "ground") a runtime module lives in; None: not ours."""
    parts = name.split(".")
    if parts[0] != "runtime":
        return None
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return "top"
    return "ground" if parts[1] in GROUND else parts[1]


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_runtime_module_has_a_home():
    for rel, _ in modules("runtime"):
        home = _home(_module_name(rel))
        assert home in {"top", "ground", *LAYERS}, f"{rel}: not in a known folder ({LAYERS})"


def test_folders_import_one_way():
    rank = {"ground": -1, **{name: i for i, name in enumerate(LAYERS)}}
    for rel, imps in modules("runtime"):
        me = _home(_module_name(rel))
        if me == "top":
            continue
        for i in imps:
            other = _home(i)
            if other in (None, "top") or other == me:
                continue
            assert rank[other] < rank[me], f"{rel} ({me}) imports {i} ({other}): folders import down {LAYERS}"


def test_ground_floor_imports_no_runtime_folder():
    for rel, imps in modules("runtime"):
        if _home(_module_name(rel)) != "ground":
            continue
        bad = {i for i in imps if _home(i) not in (None, "ground", "top")}
        assert not bad, f"{rel} imports {bad}: the ground floor imports only the stdlib, third parties and itself"


def test_named_rules():
    for rel, imps in modules("runtime"):
        me = _home(_module_name(rel))
        homes = {_home(i) for i in imps}
        if me == "decider":
            assert "metrics" not in homes, f"{rel}: the decider never imports metrics/ (histogram.py, files.py)"
        if me == "server":
            assert not homes & {"cli", "workers"}, f"{rel}: server/ never imports cli/ or workers/"
        if me != "cli" and _module_name(rel) != "runtime.__main__":
            assert "cli" not in homes, f"{rel}: nothing imports cli/"


def _graph() -> dict[str, set[str]]:
    names = {_module_name(rel) for rel, _ in modules("runtime")}
    graph = {}
    for rel, imps in modules("runtime"):
        me = _module_name(rel)
        deps = set()
        for i in imps:
            while i and i not in names:
                i = i.rpartition(".")[0]
            if i and i != me and i != "runtime":
                deps.add(i)
        graph[me] = deps
    return graph


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_supervisor_loads_no_torch_grpc_or_web_servers():
    """`--workers N`: the supervisor process stays small; workers import the heavy parts."""
    from conftest import loaded_packages
    heavy = loaded_packages("runtime.workers.supervisor, runtime.cli.main") & \
        {"torch", "grpc", "fastapi", "uvicorn", "starlette", "numpy"}
    assert not heavy, f"the supervisor's imports load {sorted(heavy)}"


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
    found = {".".join(p.parent.relative_to(ROOT).parts) for pkg in ("splitserve", "runtime", "router", "experiments")
             for p in (ROOT / pkg).rglob("__init__.py")}
    assert declared == found


MANAGER_INTERNALS = {"harnesses", "serving", "ended", "loaded", "batch_calibration", "runner",
                     "generation", "state_since"}


def test_only_the_manager_touches_harnesses_and_entries():
    """Readers use the published views (runtime/views.py), never the manager's insides."""
    for rel, _ in modules("runtime"):
        if rel.as_posix() in ("runtime/lifecycle/manager.py", "runtime/execution/runner.py"):
            continue
        tree = ast.parse((ROOT / rel).read_text(), str(rel))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "runtime.lifecycle.manager":
                bad = {a.name for a in node.names} & {"Harness", "ModelEntry", "VersionStatus"}
                assert not bad, f"{rel} imports {bad} from runtime.lifecycle.manager: use runtime.views"
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
