"""Config-file settings while serving: what an edit changes and how it applies."""

import logging

import pytest
from pydantic import ValidationError

from runtime.config.settings import FileSettings, Settings, SettingChange, compare_settings, describe

pytestmark = pytest.mark.unit  # starts no server process, binds no socket


def S(**sections) -> Settings:
    return Settings.model_validate(sections)


@pytest.mark.parametrize("old, new, flags, expected", [
    ({}, {}, {}, []),
    ({"limits": {"max_inflight": 10}}, {"limits": {"max_inflight": 20}}, {},
     [("limits.max_inflight", 10, 20, "live")]),
    ({}, {"limits": {"request_timeout_s": 5}}, {}, [("limits.request_timeout_s", 30.0, 5.0, "live")]),
    ({}, {"limits": {"max_body_bytes": 2048}}, {}, [("limits.max_body_bytes", 64 << 20, 2048, "live_rest")]),
    ({}, {"limits": {"max_elements": 7}}, {}, [("limits.max_elements", 16 << 20, 7, "live_rest")]),
    ({}, {"server": {"http_port": 9000}}, {}, [("server.http_port", 8000, 9000, "restart")]),
    ({}, {"server": {"http_port": 9000}}, {"server.http_port": "--http-port"},
     [("server.http_port", 8000, 9000, "flag")]),
    ({}, {"server": {"host": "0.0.0.0", "drain_timeout_s": 1}}, {},
     [("server.drain_timeout_s", 30.0, 1.0, "restart"), ("server.host", "127.0.0.1", "0.0.0.0", "restart")]),
    ({}, {"server": {"access_log": "all"}}, {}, [("server.access_log", "sample", "all", "live")]),
    ({}, {"log_level": "debug"}, {}, [("log_level", "INFO", "DEBUG", "live")]),
    ({}, {"shadow_max_inflight": 3}, {}, [("shadow_max_inflight", 64, 3, "restart")]),
    ({}, {"repository": {"quiet_s": 2}}, {}, [("repository.quiet_s", 0.5, 2.0, "restart")]),
    # a key removed from the file goes back to its default: that is a change too
    ({"limits": {"max_inflight": 10}}, {}, {}, [("limits.max_inflight", 10, 4096, "live")]),
    ({"server": {"token": "a"}}, {"server": {"token": "b"}}, {}, [("server.token", "a", "b", "restart")]),
    ({"server": {"http_port": 1}}, {"server": {"http_port": 1}}, {}, []),
])
def test_compare_settings(old, new, flags, expected):
    got = compare_settings(S(**old), S(**new), flags)
    assert [(c.key, c.old, c.new, c.how) for c in got] == expected
    assert all(c.flag == flags.get(c.key) for c in got)


def test_describe_is_one_line_and_names_the_flag():
    with pytest.raises(Exception) as e:
        S(server={"http_port": 70000, "htp_port": 1}, log_level="loud")
    msg = describe(e.value, {"server.http_port": "--http-port"})
    assert "\n" not in msg
    assert "--http-port: Input should be less than or equal to 65535 (got 70000)" in msg
    assert "server.htp_port: unknown key" in msg and "log_level:" in msg
    with pytest.raises(Exception) as e:
        S(server={"token": "has space"})
    assert "has space" not in describe(e.value)  # secrets are never echoed


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, r):
        self.lines.append((r.levelno, r.getMessage()))


@pytest.fixture
def records():
    h, lg = Records(), logging.getLogger("splitserve.settings")
    old = lg.level
    lg.setLevel(logging.DEBUG)
    lg.addHandler(h)
    yield h
    lg.removeHandler(h)
    lg.setLevel(old)


def test_reload_applies_live_keys_in_place_and_warns_for_the_rest(tmp_path, records):
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("server: {http_port: 8000, token: old-secret}\nlimits: {max_inflight: 10}\nmodels: {}\n")
    live = S(server={"http_port": 0, "token": "old-secret"}, limits={"max_inflight": 10})
    live.config_path = cfg
    limits, server = live.limits, live.server  # what the servers hold
    fs = FileSettings(live)
    cfg.write_text("server: {http_port: 9000, token: new-secret, access_log: all}\n"
                   "limits: {max_inflight: 20, max_body_bytes: 4096}\nmodels: {}\n")
    changes = fs.reload()
    assert {c.key: c.how for c in changes} == {
        "server.http_port": "restart", "server.token": "restart", "server.access_log": "live",
        "limits.max_inflight": "live", "limits.max_body_bytes": "live_rest"}
    assert live.limits is limits and live.server is server
    assert limits.max_inflight == 20 and limits.max_body_bytes == 4096 and server.access_log == "all"
    assert server.http_port == 0 and server.token == "old-secret"  # restart keys untouched
    warnings = [m for lv, m in records.lines if lv == logging.WARNING]
    assert any("event=setting_needs_restart key=server.http_port old=8000 new=9000" in m for m in warnings)
    assert any("key=limits.max_body_bytes" in m and "grpc=restart_needed" in m for m in warnings)
    assert any("key=server.token old='***' new='***'" in m for m in warnings)
    assert not any("secret" in m for _, m in records.lines)
    assert fs.reload() == []  # the same file again: nothing to say


def test_reload_of_an_invalid_file_changes_nothing(tmp_path, records):
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("limits: {max_inflight: 10}\n")
    live = S(limits={"max_inflight": 10})
    live.config_path = cfg
    fs = FileSettings(live)
    cfg.write_text("limits: {max_inflight: 0, request_timeout_s: 3}\n")
    assert fs.reload() == []
    assert live.limits.max_inflight == 10 and live.limits.request_timeout_s == 30.0
    errors = [m for lv, m in records.lines if lv == logging.ERROR]
    assert errors and "event=config_settings_rejected" in errors[0] and "limits.max_inflight" in errors[0]
    cfg.write_text("limits: {max_inflight: 11}\n")  # compared with the last good reading
    assert [(c.key, c.old, c.new) for c in fs.reload()] == [("limits.max_inflight", 10, 11)]
    assert live.limits.max_inflight == 11


def test_reload_reports_keys_a_flag_overrides(tmp_path, records):
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("log_level: INFO\n")
    live = S(log_level="WARNING")
    live.config_path = cfg
    live._file, live._flags = S(log_level="INFO"), {"log_level": "--log-level"}
    fs = FileSettings(live)
    cfg.write_text("log_level: DEBUG\n")
    assert [c.how for c in fs.reload()] == ["flag"]
    assert live.log_level == "WARNING"
    assert any("event=setting_overridden key=log_level" in m and "by=--log-level" in m
               for _, m in records.lines)


def test_setting_change_is_a_value():
    c = SettingChange("limits.max_inflight", 1, 2, "live")
    with pytest.raises(AttributeError):
        c.how = "restart"


def test_grpc_limits_are_named_bounded_and_strict():
    """server.grpc_limits: defaults that hold (issue 25), an unknown key or a bad value is
    one line naming the key, and an edit needs a restart (the listener took them)."""
    s = Settings.model_validate({"server": {"grpc_limits": {"idle_s": 5, "max_pings": 10}}})
    g = s.server.grpc_limits
    assert (g.idle_s, g.max_pings, g.max_connections, g.max_streams) == (5, 10, 1024, 256)
    for bad, key in (({"max_pingz": 1}, "server.grpc_limits.max_pingz: unknown key"),
                     ({"body_s": 0}, "server.grpc_limits.body_s: ")):
        with pytest.raises(ValidationError) as e:
            Settings.model_validate({"server": {"grpc_limits": bad}})
        msg = describe(e.value)
        assert msg.startswith(key) and "\n" not in msg, msg
    changes = compare_settings(Settings(), s)
    assert [(c.key, c.how) for c in changes] == [("server.grpc_limits", "restart")]


def test_grpcio_takes_the_grpc_limits_it_has_options_for():
    from types import SimpleNamespace

    from runtime.server.grpc.servicers import options
    s = Settings.model_validate({"server": {"grpc_limits": {"max_streams": 7, "idle_s": 9,
                                                            "max_age_s": 0}}})
    opts = dict(options(SimpleNamespace(settings=s), False))
    assert opts["grpc.max_concurrent_streams"] == 7 and opts["grpc.max_connection_idle_ms"] == 9000
    assert opts["grpc.http2.max_ping_strikes"] == 2 and "grpc.max_connection_age_ms" not in opts
    opts = dict(options(SimpleNamespace(settings=Settings()), False))
    assert opts["grpc.max_connection_age_ms"] == 3_600_000
