"""Scenario 8: security.

- State-changing endpoints refuse without the token when one is set (REST: PUT routing,
  POST load/unload -> 401; gRPC: SetRouting, RepositoryModelLoad/Unload ->
  UNAUTHENTICATED) and change nothing.
- The server binds to 127.0.0.1 by default: the settings say so, and the real CLI with no
  --host listens on loopback only.
- A path in a request (model name, version) never escapes the repository: `..`,
  `%2e%2e`, encoded slashes, absolute paths are refused (404/400); a model folder or a
  version folder that is a symlink out of the repository, or a model.py / weights file
  that is one, is never loaded (and its code never runs).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket

import grpc
import httpx
import psutil
import pytest

from reliability_helpers import (BODY, MLP_ALL, ROOT, ServerProcess, reconciles,
                                 wait_reconciled, watcher_barrier)
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc
from runtime.protocol.pb import splitserve_management_pb2 as mpb
from runtime.protocol.pb import splitserve_management_pb2_grpc as mpb_grpc
from runtime.types import VersionState as S

TOKEN = "s3cret-token"
CONFIG = "models:\n  mlp:\n    labels: {stable: 1, canary: 2}\n    weights: {stable: 50, canary: 50}\n"


@pytest.fixture
def guarded(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}}, yaml={"mlp": MLP_ALL})
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(CONFIG)
    srv = serve(repo, config=cfg, token=TOKEN, quiet_s=0.2)
    assert srv.available("mlp") == [1, 2]
    return srv, cfg, repo


BAD_AUTH = [None, "", "Bearer", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x",
            f"Bearer {TOKEN[:-1]}", f"bearer{TOKEN}"]


def test_state_changing_endpoints_need_the_token(guarded):
    srv, cfg, _ = guarded
    before = httpx.get(f"{srv.http}/v1/models/mlp/routing").json()
    raw = cfg.read_bytes()
    new = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 0, "canary": 100}}
    refused = 0
    for auth in BAD_AUTH:
        h = {} if auth is None else {"authorization": auth}
        for method, path, kw in (("PUT", "/v1/models/mlp/routing", {"json": new}),
                                 ("POST", "/v2/repository/models/mlp/unload", {}),
                                 ("POST", "/v2/repository/models/mlp/load", {})):
            r = httpx.request(method, srv.http + path, headers=h, timeout=30, **kw)
            assert r.status_code == 401, f"{method} {path} with {auth!r}: {r.status_code} {r.text}"
            assert "token" in r.json()["error"].lower()
            refused += 1
    # nothing changed: routing, file, loaded versions, traffic
    assert httpx.get(f"{srv.http}/v1/models/mlp/routing").json() == before
    assert cfg.read_bytes() == raw
    assert srv.available("mlp") == [1, 2]
    assert httpx.post(f"{srv.http}/v2/models/mlp/infer", json=BODY).status_code == 200

    # gRPC: the same refusals
    with grpc.insecure_channel(srv.grpc) as ch:
        inf = pb_grpc.GRPCInferenceServiceStub(ch)
        mgmt = mpb_grpc.RoutingServiceStub(ch)
        for md in (None, (("authorization", "Bearer wrong"),)):
            for call, req in ((inf.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="mlp")),
                              (inf.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="mlp")),
                              (mgmt.SetRouting, mpb.SetRoutingRequest(model="mlp", config_json=json.dumps(new)))):
                with pytest.raises(grpc.RpcError) as ei:
                    call(req, metadata=md, timeout=30)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, ei.value.details()
                refused += 1
    assert httpx.get(f"{srv.http}/v1/models/mlp/routing").json() == before
    assert srv.available("mlp") == [1, 2] and cfg.read_bytes() == raw

    # with the token the same calls work (the endpoints are real, not just broken)
    ok = {"authorization": f"Bearer {TOKEN}"}
    r = httpx.put(f"{srv.http}/v1/models/mlp/routing", json=new, headers=ok, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{srv.http}/v1/models/mlp/routing").json()["weights"] == {"stable": 0, "canary": 100}
    r = httpx.post(f"{srv.http}/v2/repository/models/mlp/unload", headers=ok, timeout=60)
    assert r.status_code == 200, r.text
    assert srv.wait_for(lambda: srv.available("mlp") == [], 30)
    r = httpx.post(f"{srv.http}/v2/repository/models/mlp/load", headers=ok, timeout=60)
    assert r.status_code == 200, r.text
    assert srv.available("mlp") == [1, 2]
    print(f"\n  security: {refused} unauthenticated state changes refused, none applied")


def test_default_bind_is_loopback(tmp_path, make_repo):
    from runtime.config.settings import ServerSettings, Settings
    assert ServerSettings().host == "127.0.0.1" and Settings().server.host == "127.0.0.1"
    from runtime.cli.main import _parser, build_settings
    args = _parser().parse_args(["serve", "--repository", str(tmp_path)])
    assert build_settings(args).server.host == "127.0.0.1"

    # a repository built for the test, never the checkout's (it may hold a user's leftovers)
    repo = make_repo({"mlp": {1: "st1", 2: "pt2_2"}})
    srv = ServerProcess(repo, cwd=tmp_path).wait_ready()  # no --host, no config
    http, grpc_port = srv.http_port, srv.grpc_port
    try:
        assert srv.host == "127.0.0.1", srv.log_text(5)  # what it logs it bound
        listening = {}
        for c in psutil.Process(srv.pid).net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                listening[c.laddr.port] = c.laddr.ip
        assert http in listening and grpc_port in listening, listening
        for port, ip in listening.items():  # grpc binds '::ffff:127.0.0.1' (v4-mapped): fine
            addr = ipaddress.ip_address(ip.split("%")[0])
            mapped = getattr(addr, "ipv4_mapped", None)
            assert addr.is_loopback or (mapped is not None and mapped.is_loopback), listening
        # and nothing answers on the machine's other addresses
        others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for ip in others:
            for port in (http, grpc_port):
                with pytest.raises(OSError):
                    socket.create_connection((ip, port), timeout=2).close()
        print(f"\n  bind: listening on {listening}; refused on {others or 'no other address'}")
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log_text(40)  # SIGTERM: a clean stop


# ---- paths that try to leave the repository ----------------------------------------------
def raw_http(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """Send the request line exactly as given (no client-side normalization of `..`)."""
    hs = {"Host": "x", "Content-Length": str(len(body)), "Connection": "close",
          "Content-Type": "application/json", **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("latin-1") + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


TRAVERSALS = [
    ("POST", "/v2/models/../../../etc/passwd/infer"),
    ("POST", "/v2/models/%2e%2e/infer"),
    ("POST", "/v2/models/%2E%2E/versions/1/infer"),
    ("POST", "/v2/models/..%2f..%2foutside/infer"),
    ("POST", "/v2/models/%2Fetc%2Fpasswd/infer"),
    ("POST", "/v2/models/mlp/versions/..%2F1/infer"),
    ("POST", "/v2/models/mlp/versions/%2e%2e/infer"),
    ("POST", "/v2/models/mlp%2F..%2F..%2Foutside/infer"),
    ("GET", "/v2/models/%2e%2e"),
    ("GET", "/v2/models/%2e%2e%2foutside/config"),
    ("GET", "/v2/models/..%5C..%5Coutside"),
    ("POST", "/v1/models/%2e%2e:predict"),
    ("POST", "/v1/models/..%2Foutside:predict"),
    ("GET", "/v1/models/%2e%2e%2Foutside"),
    ("POST", "/v2/repository/models/%2e%2e/load"),
    ("POST", "/v2/repository/models/..%2Foutside/load"),
    ("POST", "/v2/repository/models/%2Ftmp%2Foutside/load"),
    ("POST", "/v2/repository/models/outside%00/load"),
    ("POST", "/v2/repository/models/%2e%2e/unload"),
    ("PUT", "/v1/models/%2e%2e/routing"),
    ("GET", "/v1/models/..%2Foutside/routing"),
]


@pytest.fixture
def outside(tmp_path, version_cache):
    """A complete, valid model folder OUTSIDE the repository whose model.py leaves a
    marker when it is imported, so a test can tell whether its code ever ran."""
    out = tmp_path / "outside"
    marker = tmp_path / "outside_code_ran"
    model = out / "evil"
    model.mkdir(parents=True)
    arch = (ROOT / "model_repository" / "mlp" / "model.py").read_text()
    (model / "model.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n" + arch)
    (model / "model.yaml").write_text(MLP_ALL)
    shutil.copytree(version_cache / "st1", model / "1")
    return out, marker


def test_request_paths_never_escape_the_repository(guarded, outside):
    srv, _, repo = guarded
    out, marker = outside
    (repo / "outside").symlink_to(out / "evil", target_is_directory=True)  # a model symlink out
    watcher_barrier(srv, repo, "mlp", "outside")  # the symlink's event is done with
    before = set(srv.core.manager.models)
    for method, path in TRAVERSALS:
        body = json.dumps(BODY).encode() if method == "POST" else b""
        if method == "PUT":
            body = b'{"weights": {"1": 1}}'
        status, text = raw_http(srv.server.http_port, method, path, body,
                                {"Authorization": f"Bearer {TOKEN}"})
        assert status in (400, 404), f"{method} {path}: {status} {text[:200]!r}"
    assert set(srv.core.manager.models) <= before | {"outside"}
    assert srv.core.manager.state_of("outside", 1) is None
    assert not marker.exists(), "code from outside the repository ran"
    assert httpx.post(f"{srv.http}/v2/models/mlp/infer", json=BODY).status_code == 200


def test_symlinked_model_folder_out_of_the_repository_is_refused(guarded, outside):
    srv, _, repo = guarded
    out, marker = outside
    (repo / "evil").symlink_to(out / "evil", target_is_directory=True)
    # the watcher delivered its event and the manager acted on it; nothing may load from it
    watcher_barrier(srv, repo, "mlp", "evil")
    assert srv.core.manager.state_of("evil", 1) is None
    r = httpx.post(f"{srv.http}/v2/models/evil/infer", json=BODY)
    assert r.status_code == 404, r.text
    index = httpx.post(f"{srv.http}/v2/repository/index", json={}).json()
    assert "evil" not in {m["name"] for m in index}
    # explicitly asking to load it is refused too
    r = httpx.post(f"{srv.http}/v2/repository/models/evil/load", timeout=60,
                   headers={"authorization": f"Bearer {TOKEN}"})
    state = srv.core.manager.state_of("evil", 1)
    assert r.status_code in (400, 404), (
        f"POST .../models/evil/load -> {r.status_code} {r.text[:200]}; version 1 is {state}: a "
        f"model folder that is a symlink out of the repository was loaded")
    assert state is None and not marker.exists()


def test_symlinked_version_folder_and_files_are_never_loaded(guarded, outside, version_cache):
    srv, _, repo = guarded
    out, marker = outside
    m = repo / "mlp"
    before = reconciles(srv, "mlp")
    (m / "3").symlink_to(out / "evil" / "1", target_is_directory=True)  # a version symlink out
    (m / ".4.tmp").mkdir()  # a real folder whose weights are a symlink out
    (m / ".4.tmp" / "model.safetensors").symlink_to(out / "evil" / "1" / "model.safetensors")
    (m / ".5.tmp").mkdir()  # real weights, but the version's own model.py is a symlink out
    shutil.copy(version_cache / "st2" / "model.safetensors", m / ".5.tmp" / "model.safetensors")
    (m / ".5.tmp" / "model.py").symlink_to(out / "evil" / "model.py")
    (m / ".4.tmp").rename(m / "4")  # published by rename, each complete when it appears
    (m / ".5.tmp").rename(m / "5")
    # A pass that saw both folders (so also the symlink 3, made before them), and the
    # model settled after it: whatever it loads or refuses has happened.
    mgr = srv.core.manager
    assert srv.wait_for(lambda: mgr.reconciles["mlp"] > before
                        and {4, 5} <= set(mgr.view().model("mlp").present), 30), "no pass saw 4 and 5"
    assert wait_reconciled(srv, "mlp", after=before)
    states = {v: srv.core.manager.state_of("mlp", v) for v in (3, 4, 5)}
    for v in (3, 4, 5):
        r = httpx.post(f"{srv.http}/v2/models/mlp/versions/{v}/infer", json=BODY)
        assert r.status_code in (404, 503), f"version {v}: {r.status_code} {r.text[:200]}"
    assert states[3] is None, states
    assert states[4] is not S.AVAILABLE, states
    assert not marker.exists(), (f"a model.py symlinked from outside the repository was "
                                 f"imported (states {states})")
    assert states[5] is not S.AVAILABLE, states
    assert srv.available("mlp") == [1, 2]


def test_model_py_symlinked_out_of_the_repository_never_runs(make_repo, serve, outside, version_cache):
    """The model folder's own model.py is a symlink to code outside the repository."""
    out, marker = outside
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": MLP_ALL})
    srv = serve(repo, quiet_s=0.2)
    staging = repo / ".mlp2.tmp"  # not a model name: ignored until renamed
    staging.mkdir()
    (staging / "model.yaml").write_text(MLP_ALL)
    (staging / "model.py").symlink_to(out / "evil" / "model.py")
    shutil.copytree(version_cache / "st2", staging / "1")
    staging.rename(repo / "mlp2")  # the model appears complete
    assert wait_reconciled(srv, "mlp2", after=0), "the manager never looked at mlp2"
    def present():
        mv = srv.core.manager.view().model("mlp2")
        return mv is not None and 1 in mv.present
    assert srv.wait_for(present, 10)
    state = srv.core.manager.state_of("mlp2", 1)
    assert not marker.exists(), f"outside code ran; mlp2 version 1 is {state}"
    assert state is not S.AVAILABLE
    assert srv.available("mlp") == [1]
