"""Regenerate runtime/protocol/pb/ from proto/*.proto, or check that it is fresh.

    python tools/gen_proto.py            # regenerate (needs grpcio-tools)
    python tools/gen_proto.py --check    # exit 1 when the checked-in code is stale

What it produces, per proto/NAME.proto: NAME_pb2.py, NAME_pb2.pyi and, when the
file declares a service, NAME_pb2_grpc.py; plus the package's __init__.py.
Two fixes are applied to protoc's output:

- imports between generated modules become package-relative
  (`from . import model_config_pb2 as ...`), never top-level, so nothing needs
  runtime/protocol/pb on sys.path;
- the descriptors go into `runtime.protocol.pb.POOL`, a pool of our own, not
  protobuf's default pool. tritonclient registers its own copy of Triton's
  `inference` package (same file names, same symbols) in the default pool,
  and the two must load in one process: a test or tool that runs a splitserve
  server next to a Triton client would otherwise fail at import with
  "duplicate file name".

The generator is pinned (GENERATOR below, also pinned in pyproject's dev
extras): protoc stamps its own protobuf version into the _pb2 modules, and a
protobuf runtime older than that stamp refuses to import them (VersionError).
An old generator makes code that imports on every runtime from its stamp up,
so the pin sets the oldest protobuf we support (`protobuf>=` in pyproject,
kept equal by tests/protocol/test_pb_fresh.py). Today: grpcio-tools 1.80.1,
protoc 31.1, gencode 6.31.1, which runs on protobuf 6.31.1 .. 7.x, so the
server runs beside tritonclient (which pins protobuf<7). Bump it only with a
reason, and never past a protobuf that common clients cannot install.

--check generates into a temporary folder and compares byte for byte; it
refuses to run with any other grpcio-tools than the pinned one.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "runtime" / "protocol" / "pb"
PACKAGE = "runtime.protocol.pb"
GENERATOR = "1.80.1"  # grpcio-tools; see the module docstring before changing it

INIT_TEMPLATE = '''\
"""Generated protobuf and gRPC code for splitserve's wire protocols.

Generated from proto/*.proto by `python tools/gen_proto.py`: never edit these
files by hand; tests/protocol/test_pb_fresh.py fails when they are stale.

    grpc_service_pb2, grpc_service_pb2_grpc     KServe v2 / Triton `inference`
    model_config_pb2                            inference.ModelConfig
    splitserve_management_pb2, ..._pb2_grpc     splitserve.management.v1

The descriptors live in POOL, a descriptor pool of their own, not in
protobuf's default pool: tritonclient registers its own copy of Triton's
`inference` package in the default pool, and both must load in one process.
Pass POOL wherever a pool is asked for (e.g. grpc reflection).
"""

from google.protobuf import descriptor_pool as _descriptor_pool

POOL = _descriptor_pool.DescriptorPool()

# The generator that wrote this package (its protoc stamps the _pb2 modules).
GENERATED_WITH = {{"grpcio-tools": "{tools_version}"}}
'''

def _tools_version() -> str:
    try:
        return importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _require_generator() -> None:
    """Exit with a one-line reason unless the pinned grpcio-tools is installed."""
    have = _tools_version()
    if have != GENERATOR:
        sys.exit(f"gen_proto: needs grpcio-tools=={GENERATOR} (the pinned generator; this"
                 f" environment has {have}): pip install -e '.[dev]'")


def _protos() -> list[Path]:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        sys.exit(f"gen_proto: no .proto files in {PROTO_DIR}")
    return protos


def _fix_imports(text: str, modules: set[str]) -> str:
    """Make imports of sibling generated modules package-relative."""

    def repl(m: re.Match[str]) -> str:
        mod, alias = m.group(1), m.group(2)
        return f"from . import {mod} as {alias}" if mod in modules else m.group(0)

    return re.sub(r"^import (\w+) as (\w+)$", repl, text, flags=re.M)


def _use_own_pool(text: str) -> str:
    """Register descriptors in runtime.protocol.pb.POOL, not the default pool."""
    marker = "_descriptor_pool.Default().AddSerializedFile("
    if text.count(marker) != 1:
        raise RuntimeError("gen_proto: unexpected protoc output (AddSerializedFile)")
    text = text.replace(marker, "_POOL.AddSerializedFile(")
    anchor = "# @@protoc_insertion_point(imports)\n"
    if anchor not in text:
        raise RuntimeError("gen_proto: unexpected protoc output (imports marker)")
    return text.replace(anchor, anchor + "\nfrom . import POOL as _POOL\n", 1)


def generate(out_dir: Path) -> None:
    """Write the whole generated package into out_dir (which must be empty)."""
    _require_generator()
    try:  # imported here so --help works without grpcio-tools
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("gen_proto: grpcio-tools is needed (a dev dependency: pip install grpcio-tools)")

    wkt_include = Path(grpc_tools.__file__).parent / "_proto"
    protos = _protos()
    with tempfile.TemporaryDirectory(prefix="gen_proto_raw_") as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{wkt_include}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *[str(p) for p in protos],
        ]
        if protoc.main(args) != 0:
            sys.exit("gen_proto: protoc failed (see the messages above)")
        raw_dir = Path(raw)
        modules = {p.stem + "_pb2" for p in protos}
        for path in sorted(raw_dir.iterdir()):
            text = path.read_text()
            if path.name.endswith("_pb2_grpc.py") and "class " not in text:
                continue  # the .proto declares no service: nothing to keep
            text = _fix_imports(text, modules)
            if path.name.endswith("_pb2.py"):
                text = _use_own_pool(text)
            (out_dir / path.name).write_text(text)
    (out_dir / "__init__.py").write_text(INIT_TEMPLATE.format(tools_version=_tools_version()))


def _listing(d: Path) -> dict[str, str]:
    return {
        p.name: p.read_text()
        for p in sorted(d.iterdir())
        if p.is_file() and p.suffix in (".py", ".pyi")
    }


def check() -> int:
    """0 when OUT_DIR matches a fresh generation; 1 (with a report) when stale."""
    if not OUT_DIR.is_dir():
        print(f"gen_proto --check: {OUT_DIR.relative_to(ROOT)} is missing;"
              " run: python tools/gen_proto.py", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="gen_proto_check_") as tmp:
        generate(Path(tmp))
        fresh, current = _listing(Path(tmp)), _listing(OUT_DIR)
    problems: list[str] = []
    for name in sorted(fresh.keys() | current.keys()):
        if name not in current:
            problems.append(f"missing: {name}")
        elif name not in fresh:
            problems.append(f"not generated from proto/ (remove it): {name}")
        elif fresh[name] != current[name]:
            diff = difflib.unified_diff(
                current[name].splitlines(), fresh[name].splitlines(),
                f"checked-in/{name}", f"fresh/{name}", n=1, lineterm="",
            )
            lines = list(diff)
            if any("AddSerializedFile(" in line for line in lines):
                lines = [line for line in lines if "AddSerializedFile(" not in line]
                lines.insert(0, "(the serialized descriptor differs: a .proto changed)")
            excerpt = [line[:200] for line in lines[:20]]
            problems.append(f"differs: {name}\n    " + "\n    ".join(excerpt))
    rel = OUT_DIR.relative_to(ROOT)
    if problems:
        print(f"gen_proto --check: {rel} is stale relative to proto/:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print("  regenerate with: python tools/gen_proto.py", file=sys.stderr)
        return 1
    print(f"gen_proto --check: {rel} is fresh (grpcio-tools {GENERATOR})")
    return 0


def regenerate() -> None:
    """Replace OUT_DIR's generated files with a fresh generation."""
    with tempfile.TemporaryDirectory(prefix="gen_proto_") as tmp:
        generate(Path(tmp))
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for old in OUT_DIR.iterdir():
            if old.is_file() and old.suffix in (".py", ".pyi"):
                old.unlink()
        shutil.rmtree(OUT_DIR / "__pycache__", ignore_errors=True)
        for new in sorted(Path(tmp).iterdir()):
            shutil.copyfile(new, OUT_DIR / new.name)
    names = ", ".join(sorted(p.name for p in OUT_DIR.iterdir() if p.is_file()))
    print(f"gen_proto: wrote {OUT_DIR.relative_to(ROOT)}/: {names}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true",
        help="exit 1 when runtime/protocol/pb differs from a fresh generation",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    regenerate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
