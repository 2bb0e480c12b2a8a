"""`splitserve serve` flags: validated, one-line errors with status 2, and only flags
that were given override the config file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cli.main import CliError, _parser, build_settings, main

ROOT = Path(__file__).resolve().parents[2]


def settings_for(*argv, env=None, notes=None):
    return build_settings(_parser().parse_args(["serve", *argv]), env=env or {}, notes=notes)


def write_config(tmp_path, text: str) -> Path:
    p = tmp_path / "splitserve.yaml"
    p.write_text(text)
    return p


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_config_values_stand_unless_a_flag_is_given(tmp_path):
    repo = tmp_path / "from-config"
    cfg = write_config(tmp_path, f"repository: {{path: {repo}, quiet_s: 2}}\n"
                                 "server: {http_port: 9100, grpc_port: 9101, access_log: all}\n"
                                 "log_level: debug\n")
    s = settings_for("--config", str(cfg))
    assert s.repository.path == repo and s.repository.quiet_s == 2
    assert (s.server.http_port, s.server.grpc_port, s.server.access_log, s.log_level) == (9100, 9101, "all", "DEBUG")
    assert s._flags == {}
    s = settings_for("--config", str(cfg), "--repository", str(tmp_path / "flag"), "--http-port", "0",
                     "--access-log", "off", "--log-level", "warning")
    assert s.repository.path == tmp_path / "flag" and s.repository.quiet_s == 2
    assert (s.server.http_port, s.server.grpc_port, s.server.access_log, s.log_level) == (0, 9101, "off", "WARNING")
    assert s._flags == {"repository.path": "--repository", "server.http_port": "--http-port",
                        "server.access_log": "--access-log", "log_level": "--log-level"}
    assert s._file.server.http_port == 9100  # what the file alone says, for reload comparisons


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_token_sources_and_precedence(tmp_path):
    cfg = write_config(tmp_path, "server: {token: from-file-config}\n")
    tf = tmp_path / "token"
    tf.write_text("from-token-file\n")
    tf.chmod(0o600)
    env = {"SPLITSERVE_TOKEN": "from-env"}
    assert settings_for("--config", str(cfg)).server.token == "from-file-config"
    assert settings_for("--config", str(cfg), env=env).server.token == "from-env"
    notes = []
    assert settings_for("--config", str(cfg), "--token", "from-flag", env=env, notes=notes).server.token == "from-flag"
    assert any("event=token_on_command_line" in n for n in notes)
    notes = []
    s = settings_for("--config", str(cfg), "--token-file", str(tf), env=env, notes=notes)
    assert s.server.token == "from-token-file" and notes == [] and s._flags["server.token"] == "--token-file"
    tf.chmod(0o644)
    notes = []
    settings_for("--token-file", str(tf), "--config", str(cfg), notes=notes)
    assert any("event=token_file_readable" in n and "mode=0o644" in n for n in notes)


@pytest.mark.parametrize("argv, says", [
    (["--http-port", "70000"], "argument --http-port: must be an integer from 0 to 65535, got '70000'"),
    (["--grpc-port", "-1"], "argument --grpc-port: must be an integer from 0 to 65535"),
    (["--http-port", "eighty"], "argument --http-port: must be an integer"),
    (["--log-level", "loud"], "argument --log-level: must be one of DEBUG, INFO"),
    (["--log-format", "xml"], "argument --log-format: invalid choice"),
    (["--access-log", "some"], "argument --access-log: invalid choice"),
    (["--host", "not a host"], "argument --host: not an IP address or host name"),
    (["--token", "t", "--token-file", "f"], "not allowed with argument"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_bad_flags_are_one_line_and_status_2(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err, err


@pytest.mark.parametrize("setup, argv, says", [
    (None, ["--repository", "{tmp}/missing"], "model repository {tmp}/missing is not a directory (does not exist)"),
    (None, ["--config", "{tmp}/missing.yaml"], "config file {tmp}/missing.yaml does not exist"),
    ("server: [1, 2\n", ["--config", "{cfg}"], "is not valid YAML"),
    ("- a\n- b\n", ["--config", "{cfg}"], "expected a mapping at the top level"),
    ("server: {http_port: 70000}\n", ["--config", "{cfg}"], "server.http_port: Input should be less than or equal to 65535 (got 70000)"),
    ("server: {htp_port: 1}\n", ["--config", "{cfg}"], "server.htp_port: unknown key"),
    ("log_level: chatty\n", ["--config", "{cfg}"], "log_level: Input should be"),
    (None, ["--token", "two words"], "--token: a token is 1 to 4096 visible ASCII characters"),
    (None, ["--token-file", "{tmp}/nope"], "--token-file {tmp}/nope: No such file or directory"),
    (None, ["--token-file", "{tmp}"], "not a regular file"),
    ("", ["--token-file", "{cfg}"], "the file is empty"),
    (None, ["--http-port", "9000", "--grpc-port", "9000"], "the HTTP and gRPC ports are both 9000 (--http-port, --grpc-port)"),
    ("server: {grpc_port: 9000}\n", ["--config", "{cfg}", "--http-port", "9000"],
     "ports are both 9000 (--http-port, server.grpc_port)"),
])
@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_bad_values_are_one_line_and_status_2(tmp_path, monkeypatch, capsys, setup, argv, says):
    monkeypatch.chdir(tmp_path)  # no ./configs/splitserve.yaml here
    monkeypatch.delenv("SPLITSERVE_TOKEN", raising=False)
    cfg = tmp_path / "cfg.yaml"
    if setup is not None:
        cfg.write_text(setup)
    (tmp_path / "repo").mkdir()
    fmt = {"tmp": str(tmp_path), "cfg": str(cfg)}
    argv = [a.format(**fmt) for a in argv]
    if "--repository" not in argv:
        argv += ["--repository", str(tmp_path / "repo")]
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("splitserve: error: ") and "Traceback" not in err, err
    assert says.format(**fmt) in err, err


def test_the_real_command_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "runtime", "serve", "--http-port", "70000"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.splitlines() == ["splitserve serve: error: argument --http-port: must be an "
                                     "integer from 0 to 65535, got '70000' (see 'splitserve serve --help')"]


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_transport_flags_and_their_auto_defaults(tmp_path):
    from runtime.server import loops
    cfg = write_config(tmp_path, "server: {loop: asyncio, http: h11, grpc_threads: 2}\n")
    s = settings_for("--config", str(cfg))
    assert (s.server.loop, s.server.http, s.server.grpc_threads) == ("asyncio", "h11", 2)
    s = settings_for("--config", str(cfg), "--loop", "uvloop", "--http", "httptools",
                     "--grpc-threads", "0")
    assert (s.server.loop, s.server.http, s.server.grpc_threads) == ("uvloop", "httptools", 0)
    s = settings_for()
    assert (s.server.loop, s.server.http, s.server.grpc_threads) == ("auto", "auto", 0)
    # uvicorn[standard] is a dependency: auto means the fast ones
    assert (loops.loop_name("auto"), loops.http_name("auto")) == ("uvloop", "httptools")
    assert (loops.loop_name("asyncio"), loops.http_name("h11")) == ("asyncio", "h11")
    with pytest.raises(CliError, match="--grpc-threads: .*greater than or equal to 0"):
        settings_for("--grpc-threads", "-1")


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_fleet_flags_advertise_url_and_lease(tmp_path):
    cfg = write_config(tmp_path, "server: {experiment_lease_s: 4, advertise_url: 'http://10.0.0.7:8000'}\n")
    s = settings_for("--config", str(cfg))
    assert (s.server.experiment_lease_s, s.server.advertise_url) == (4, "http://10.0.0.7:8000")
    s = settings_for("--config", str(cfg), "--advertise-url", "http://pod-1.splitserve:8000")
    assert s.server.advertise_url == "http://pod-1.splitserve:8000"
    assert (settings_for().server.experiment_lease_s, settings_for().server.advertise_url) == (15, None)
    with pytest.raises(CliError, match="--advertise-url: expected http://HOST:PORT"):
        settings_for("--advertise-url", "https://10.0.0.7:8000/path")
    with pytest.raises(CliError, match="experiment_lease_s: .*greater than or equal to 1"):
        settings_for("--config", str(write_config(tmp_path, "server: {experiment_lease_s: 0.1}\n")))
