"""A repository laid out as Triton's docs show (config.pbtxt, <version>/model.pt, no
model.yaml) serves as it is: tritonclient (HTTP and gRPC) with Triton's tensor names gets
the numbers of the version that answered; what splitserve does not act on is one line per
field; another platform is one line saying what is served."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import expected_output
from runtime.repository.scan import scan_model
from runtime.types import VersionState

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

CONFIG = """
name: "mlp_ts"
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }
]
output [
  {
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ 8 ]
  }
]
version_policy: { latest: { num_versions: 2 } }
instance_group [ { count: 2, kind: KIND_CPU } ]  # Triton's: not splitserve's
"""


@pytest.fixture
def triton_repo(tmp_path, version_cache):
    import shutil
    root = tmp_path / "models"
    (root / "mlp_ts").mkdir(parents=True)
    (root / "mlp_ts" / "config.pbtxt").write_text(CONFIG)
    for v in (1, 2):  # TorchScript files, as Triton's pytorch backend loads them
        (root / "mlp_ts" / str(v)).mkdir()
        shutil.copy2(version_cache / "ts4" / "model.pt", root / "mlp_ts" / str(v) / "model.pt")
    return root


def test_config_pbtxt_is_the_spec_and_unsupported_fields_are_lines(triton_repo):
    folder = scan_model(triton_repo / "mlp_ts")
    assert folder.spec_error is None
    sig = folder.spec.declared_signature()
    assert [(t.name, t.datatype, t.shape) for t in sig.inputs] == [("INPUT__0", "FP32", (-1, 64))]
    assert [(t.name, t.shape) for t in sig.outputs] == [("OUTPUT__0", (-1, 8))]
    assert folder.spec.max_batch_size == 8 and folder.spec.version_policy.latest == 2
    assert dict(folder.ignored)["config.pbtxt: instance_group"] == "not supported by splitserve: ignored"
    assert {v.format for v in folder.versions.values()} == {"model.pt"}

    (triton_repo / "mlp_ts" / "config.pbtxt").write_text(CONFIG.replace("pytorch_libtorch", "onnxruntime_onnx"))
    bad = scan_model(triton_repo / "mlp_ts")
    assert bad.spec_error == ("mlp_ts/config.pbtxt: platform 'onnxruntime_onnx'; splitserve serves "
                              "platform 'pytorch_libtorch' (backend 'pytorch') with <version>/model.pt")
    (triton_repo / "mlp_ts" / "model.yaml").write_text("max_batch_size: 4\n")
    both = scan_model(triton_repo / "mlp_ts")
    assert both.spec_error is None and both.spec.max_batch_size == 4
    assert dict(both.ignored)["config.pbtxt"] == "not read: model.yaml describes this model"


def test_a_triton_repository_serves_under_tritonclient(triton_repo, serve):
    srv = serve(triton_repo)
    assert srv.wait_state("mlp_ts", 2, VersionState.AVAILABLE) and srv.wait_state("mlp_ts", 1, VersionState.AVAILABLE)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    want = expected_output(4, torch.from_numpy(x)).numpy()

    http = httpclient.InferenceServerClient(srv.http.removeprefix("http://"))
    meta = http.get_model_metadata("mlp_ts")
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [("INPUT__0", "FP32", [-1, 64])]
    assert [o["name"] for o in meta["outputs"]] == ["OUTPUT__0"]
    inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    for version in ("", "1"):
        r = http.infer("mlp_ts", [inp], model_version=version,
                       outputs=[httpclient.InferRequestedOutput("OUTPUT__0", binary_data=True)])
        assert np.allclose(r.as_numpy("OUTPUT__0"), want, atol=1e-5)
    assert r.get_response()["model_version"] == "1"

    grpc = grpcclient.InferenceServerClient(srv.grpc)
    ginp = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    g = grpc.infer("mlp_ts", [ginp], outputs=[grpcclient.InferRequestedOutput("OUTPUT__0")])
    assert np.allclose(g.as_numpy("OUTPUT__0"), want, atol=1e-5)
    grpc.close()
