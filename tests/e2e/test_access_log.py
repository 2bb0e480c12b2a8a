"""The REST access log on a live server: what a line says, what each mode writes, and that
a config-file edit switches it (and the limits) without a restart."""

import asyncio
import logging

import httpx
import pytest

from runtime.logs import parse
from runtime.server.rest.access_log import AccessLog
from runtime.config.settings import ServerSettings

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
BAD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [0.5] * 3}]}


class Lines(logging.Handler):
    def __init__(self, logger: str):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(logger)

    def emit(self, r):
        self.records.append(r)

    def fields(self) -> list[dict]:
        return [{k: v for k, v, _ in parse(r.getMessage())[0]} for r in list(self.records)]

    def __enter__(self):
        self._old = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self._old)


@pytest.fixture
def mlp(make_repo, serve):
    return serve(make_repo({"mlp": {1: "st1"}}))


def test_a_line_names_method_path_status_model_version_and_request_id(mlp):
    mlp.core.settings.server.access_log = "all"
    with Lines("splitserve.access") as log:
        r = httpx.post(f"{mlp.http}/v2/models/mlp/infer", json=BODY)
        assert r.status_code == 200, r.text
        assert mlp.wait_for(lambda: len(log.records) >= 1, 10)
    (line,) = log.fields()
    assert line["event"] == "access" and line["method"] == "POST"
    assert line["path"] == "/v2/models/mlp/infer" and line["status"] == 200
    assert line["model"] == "mlp" and line["version"] == 1
    assert line["request_id"] == r.headers["x-request-id"]
    assert line["client"] == "127.0.0.1" and isinstance(line["ms"], float) and line["ms"] > 0
    assert log.records[0].levelno == logging.INFO


def test_sample_mode_logs_every_error_and_a_fraction_of_the_rest(mlp):
    srv = mlp.core.settings.server
    assert srv.access_log == "sample"  # the default
    srv.access_log_sample = 0.0
    with Lines("splitserve.access") as log:
        for _ in range(5):
            assert httpx.post(f"{mlp.http}/v2/models/mlp/infer", json=BODY).status_code == 200
        bad = httpx.post(f"{mlp.http}/v2/models/mlp/infer", json=BAD)
        assert bad.status_code == 400
        assert httpx.get(f"{mlp.http}/v2/models/nope/ready").status_code == 404
        assert httpx.get(f"{mlp.http}/v1/models/mlp:nosuchverb").status_code in (400, 404)
        assert mlp.wait_for(lambda: len(log.records) >= 3, 10)
        got = [(f["status"], f["model"]) for f in log.fields()]
        assert got[:2] == [(400, "mlp"), (404, "nope")] and got[2][1] == "mlp" and len(got) == 3
        srv.access_log_sample = 0.5  # evenly spaced: exactly every second success
        log.records.clear()
        for _ in range(6):
            assert httpx.get(f"{mlp.http}/v2/health/ready").status_code == 200
        assert mlp.wait_for(lambda: len(log.records) >= 3, 10)
        assert [f["path"] for f in log.fields()] == ["/v2/health/ready"] * 3


def test_off_logs_nothing(mlp):
    mlp.core.settings.server.access_log = "off"
    with Lines("splitserve.access") as log:
        assert httpx.post(f"{mlp.http}/v2/models/mlp/infer", json=BAD).status_code == 400
        assert httpx.get(f"{mlp.http}/no/such/path").status_code == 404
        mlp.core.settings.server.access_log = "all"  # a later request proves the earlier were seen
        assert httpx.get(f"{mlp.http}/v2/health/live").status_code == 200
        assert mlp.wait_for(lambda: len(log.records) >= 1, 10)
    assert [f["path"] for f in log.fields()] == ["/v2/health/live"]


def test_a_hostile_path_stays_one_quoted_value(mlp):
    mlp.core.settings.server.access_log = "all"
    with Lines("splitserve.access") as log:
        r = httpx.get(f"{mlp.http}/v2/models/x%0aevent=forged%20status=200/ready")
        assert r.status_code == 404
        assert mlp.wait_for(lambda: len(log.records) >= 1, 10)
    msg = log.records[0].getMessage()
    assert "\n" not in msg
    (line,) = log.fields()
    assert line["event"] == "access" and line["status"] == 404
    assert line["path"] == "/v2/models/x\nevent=forged status=200/ready"


def test_errors_are_capped_per_second_and_the_skipped_counted(monkeypatch):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def sent(message):
        pass

    monkeypatch.setattr("runtime.server.rest.access_log.ERRORS_PER_S", 3)
    mw = AccessLog(app, ServerSettings(access_log="sample"))
    now = [100.0]
    mw.clock = lambda: now[0]
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "client": ("127.0.0.1", 1)}

    async def requests(n):
        for _ in range(n):
            await mw(scope, None, sent)

    with Lines("splitserve.access") as log:
        asyncio.run(requests(10))
        assert len(log.records) == 3
        now[0] = 101.0
        asyncio.run(requests(1))
    assert [f.get("suppressed") for f in log.fields()] == [None, None, None, 7]


@pytest.mark.slow
def test_config_edit_switches_access_log_and_limits_live(make_repo, serve, tmp_path):
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("server: {access_log: 'off', http_port: 8000}\nlimits: {max_body_bytes: 67108864}\nmodels: {}\n")
    srv = serve(make_repo({"mlp": {1: "st1"}}), config=cfg)
    settings = srv.core.settings
    settings.server.access_log = "off"
    with Lines("splitserve.access") as access, Lines("splitserve.settings") as changes:
        cfg.write_text("server: {access_log: all, http_port: 9999}\nlimits: {max_body_bytes: 2048}\nmodels: {}\n")
        assert srv.wait_for(lambda: settings.limits.max_body_bytes == 2048, 30)
        assert settings.server.access_log == "all"
        r = httpx.post(f"{srv.http}/v2/models/mlp/infer", json=BODY)  # ~700 bytes: fits
        assert r.status_code == 200, r.text
        r = httpx.post(f"{srv.http}/v2/models/mlp/infer", content=b" " * 4096)
        assert r.status_code == 413, r.text
        assert srv.wait_for(lambda: len(access.records) >= 2, 10)
        msgs = [r.getMessage() for r in changes.records]
    assert [f["status"] for f in access.fields()] == [200, 413]
    assert any("event=setting_needs_restart key=server.http_port old=8000 new=9999" in m for m in msgs), msgs
    assert any("event=setting_applied key=server.access_log old='off' new='all'" in m for m in msgs), msgs


def test_every_refused_state_change_is_one_warning(make_repo, serve, tmp_path):
    """Issue 11 item 7: the audit trail. A wrong token, an invalid routing document and a
    change of an unknown model are each refused with a 4xx, and each leaves one WARNING
    line naming the action and why (never the token itself)."""
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("models:\n  mlp:\n    weights: {1: 100}\n")
    srv = serve(make_repo({"mlp": {1: "st1"}}), config=cfg, token="s3cret-token")
    good = {"Authorization": "Bearer s3cret-token"}
    with Lines("splitserve") as log:
        r1 = httpx.put(f"{srv.http}/v1/models/mlp/routing", json={"weights": {"1": 100}},
                       headers={"Authorization": "Bearer wrong"})
        r2 = httpx.put(f"{srv.http}/v1/models/mlp/routing", json={"weights": {"1": -5}}, headers=good)
        r3 = httpx.post(f"{srv.http}/v2/repository/models/mlp/unload")
        assert (r1.status_code, r2.status_code, r3.status_code) == (401, 400, 401), (r1.text, r2.text, r3.text)
        assert srv.wait_for(lambda: sum(r.levelno == logging.WARNING for r in log.records) >= 3, 10)
    refused = [f for f, r in zip(log.fields(), log.records)
               if r.levelno == logging.WARNING and f.get("event") == "state_change_refused"]
    assert len(refused) == 3, [r.getMessage() for r in log.records]
    assert all("\n" not in r.getMessage() and "s3cret" not in r.getMessage() and "wrong" not in
               r.getMessage().split("reason=")[0] for r in log.records)
    reasons = [f["reason"] for f in refused]
    assert sum("token" in x for x in reasons) == 2 and any("weight" in x for x in reasons), reasons
    assert cfg.read_text() == "models:\n  mlp:\n    weights: {1: 100}\n"  # nothing changed
