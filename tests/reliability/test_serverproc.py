"""The one server-process harness (tools/serverproc.py) that tests and bench/ share:
ports come from the server's log line, a child that dies is reported at once with its
log, and the layering holds (bench/ and tools/ never import tests/; runtime/ and router/
never import the harness)."""

from __future__ import annotations

import ast
import signal
import sys
import time
from pathlib import Path

import pytest

from serverproc import ChildProcess, ServerExited, ServerProcess, parse_serving

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("line,expected", [
    ("ts=2026-01-01 level=INFO logger=splitserve.server event=serving http=127.0.0.1:40123 "
     "grpc=127.0.0.1:40125 repository=/tmp/r\n", ("127.0.0.1", 40123, 40125)),
    ("event=serving http=::1:8000 grpc=::1:None repository=/r", ("::1", 8000, None)),
    ('{"ts": 1.0, "level": "info", "event": "serving", "http": "0.0.0.0:9000", '
     '"grpc": "0.0.0.0:9001", "repository": "/r"}', ("0.0.0.0", 9000, 9001)),
    ('{"level": "info", "msg": "event=serving http=127.0.0.1:1 grpc=127.0.0.1:2 repository=x"}',
     ("127.0.0.1", 1, 2)),
    ("event=loaded servable=mlp:1 device=cpu", None),
    ("event=serving_soon http=1.2.3.4:5", None),
    ("{not json event=serving", None),
])
@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_parse_serving_line(line, expected):
    assert parse_serving(line) == expected


def test_a_child_that_exits_is_reported_at_once_with_its_log(tmp_path):
    t0 = time.monotonic()
    srv = ServerProcess(tmp_path / "no-such-repository", cwd=tmp_path)
    with pytest.raises(ServerExited) as e:
        srv.wait_ready(timeout=120)
    assert time.monotonic() - t0 < 60, "waited for the timeout instead of the exit"
    msg = str(e.value)
    assert "exited with 2" in msg and "is not a directory" in msg, msg
    assert not srv.alive() and srv.stop() == 2  # idempotent


def test_quiet_log_levels_are_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="event=serving"):
        ServerProcess(tmp_path, "--log-level", "WARNING")


def test_stop_escalates_to_sigkill_and_keeps_the_log(tmp_path):
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('event=serving http=127.0.0.1:1 grpc=127.0.0.1:None', flush=True)\n"
            "time.sleep(600)\n")
    log = tmp_path / "child.log"
    child = ChildProcess([sys.executable, "-c", code], name="stubborn", log_path=log)
    child.wait_serving(60)
    assert (child.host, child.http_port, child.grpc_port) == ("127.0.0.1", 1, None)
    assert child.stop(timeout=1) == -signal.SIGKILL
    assert "event=serving" in log.read_text() and "event=serving" in child.log_text()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_bench_and_tools_do_not_import_tests_and_runtime_never_imports_the_harness():
    for folder in ("bench", "tools"):
        for f in sorted((ROOT / folder).glob("*.py")):
            bad = _imports(f) & {"tests", "conftest", "reliability_helpers"}
            assert not bad, f"{f.relative_to(ROOT)} imports {bad} from tests/"
            assert "str(ROOT / \"tests\")" not in f.read_text(), f"{f} puts tests/ on sys.path"
    for folder in ("runtime", "router"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            assert "serverproc" not in _imports(f), f"{f.relative_to(ROOT)} imports the test harness"
