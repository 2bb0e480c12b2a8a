"""The plain install stays lean: scipy is nowhere on the import path, obstore is the `s3`
extra and its absence is one line naming it."""

import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import loaded_packages

ROOT = Path(__file__).resolve().parents[2]


def test_required_dependencies_leave_out_scipy_and_obstore():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert not names & {"scipy", "obstore"}
    assert any(d.startswith("obstore") for d in project["optional-dependencies"]["s3"])


def test_serving_and_experiments_import_no_scipy_or_obstore():
    out = loaded_packages("runtime.cli.main, runtime.server.app, runtime.service.core, "
                          "experiments.engine, experiments.stats, splitserve") & {"scipy", "obstore"}
    assert not out, f"importing the server loads {sorted(out)}"


def test_an_s3_repository_without_obstore_is_one_line(tmp_path):
    code = ("import sys; sys.modules['obstore'] = sys.modules['obstore.store'] = None; "
            "from runtime.cli.main import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "serve", "--repository", "s3://bucket/models",
                           "--http-port", "0", "--grpc-port", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "level=" not in ln]
    assert errors == ["splitserve: model repository: s3://bucket/models: object-storage "
                      "repositories need obstore: pip install 'splitserve[s3]'"], proc.stderr
