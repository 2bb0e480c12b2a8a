"""Raw gRPC and binary REST inputs reach the model as views of the request's own bytes.

A real model reports the address of the tensor it was handed (`x.data_ptr()`) as an
output; the request goes through the real codec and the inference core of a live
server, and the test checks that address lies inside the bytes object the request
carried, and that the answer is right.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from runtime import dtypes
from runtime.protocol import kserve_grpc, kserve_rest
from runtime.protocol.pb import grpc_service_pb2 as pb

MODEL_PY = '''
import torch

class Ptr(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale, torch.tensor([x.data_ptr()], dtype=torch.int64)

def build_model():
    return Ptr()
'''
MODEL_YAML = '''
inputs:
  - {name: input, datatype: FP32, shape: [-1, 64]}
outputs:
  - {name: output, datatype: FP32, shape: [-1, 64]}
  - {name: ptr, datatype: INT64, shape: [1]}
max_batch_size: 0
device: cpu
'''
X = np.arange(4 * 64, dtype=np.float32).reshape(4, 64) / 7


@pytest.fixture
def srv(tmp_path, serve):
    root = tmp_path / "repo"
    (root / "ptr" / "1").mkdir(parents=True)
    (root / "ptr" / "model.py").write_text(MODEL_PY)
    (root / "ptr" / "model.yaml").write_text(MODEL_YAML)
    save_file({"scale": torch.full((1,), 3.0)}, str(root / "ptr" / "1" / "model.safetensors"))
    return serve(root)


def _inside(ptr: int, buf) -> bool:
    start = np.frombuffer(buf, np.uint8).ctypes.data
    return start <= ptr < start + len(buf)


def _run(srv, req):
    resp = srv.call(srv.core.inference.infer(req))
    out = {t.name: t.data for t in resp.outputs}
    return out["output"], int(out["ptr"][0])


def test_grpc_raw_input_reaches_the_model_without_a_copy(srv):
    msg = pb.ModelInferRequest(model_name="ptr")
    msg.inputs.add(name="input", datatype="FP32", shape=[4, 64])
    msg.raw_input_contents.append(X.tobytes())
    wire = pb.ModelInferRequest.FromString(msg.SerializeToString())  # as the server gets it
    req = kserve_grpc.decode_infer(wire, 1 << 20)
    buf = req.inputs[0].data
    while not isinstance(buf, bytes):
        buf = buf.base  # down to the bytes object protobuf handed the codec
    assert isinstance(buf, bytes) and len(buf) == X.nbytes
    out, ptr = _run(srv, req)
    assert _inside(ptr, buf), "the model got a copy, not the request's bytes"
    np.testing.assert_allclose(out, X * 3.0, rtol=1e-6)


def test_binary_rest_input_reaches_the_model_without_a_copy(srv):
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 64],
                                     "parameters": {"binary_data_size": X.nbytes}}]}).encode()
    header += b" " * (-len(header) % 16)  # the binary part starts aligned (else: one copy)
    body = header + X.tobytes()
    req, _binary = kserve_rest.decode_infer(body, len(header), "ptr", None, 1 << 20)
    out, ptr = _run(srv, req)
    assert _inside(ptr, body), "the model got a copy, not the request body"
    np.testing.assert_allclose(out, X * 3.0, rtol=1e-6)


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_to_torch_copies_only_what_a_view_cannot_hold():
    big = np.arange(64, dtype=np.float32).tobytes()
    view = np.frombuffer(big, np.float32)
    assert dtypes.to_torch(view, "FP32").data_ptr() == view.ctypes.data  # read-only: a view
    tiny = np.frombuffer(b"\x01", np.uint8)  # CPython's shared one-byte object
    assert dtypes.to_torch(tiny, "UINT8").data_ptr() != tiny.ctypes.data
    swapped = np.arange(32, dtype=">f4")
    t = dtypes.to_torch(swapped, "FP32")
    assert t.dtype == torch.float32 and t.tolist() == swapped.tolist()
    odd = np.frombuffer(b"\x00" + big, np.uint8)[1:].view(np.float32)  # misaligned start
    assert not odd.flags.aligned
    assert dtypes.to_torch(odd, "FP32").tolist() == view.tolist()
    bf = np.frombuffer(np.full(64, 0x3F80, np.uint16).tobytes(), np.uint16)
    tb = dtypes.to_torch(bf, "BF16")
    assert tb.dtype == torch.bfloat16 and tb.data_ptr() == bf.ctypes.data
    assert tb.float().tolist() == [1.0] * 64


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_no_warning_for_read_only_request_buffers(recwarn):
    view = np.frombuffer(np.ones(64, np.float32).tobytes(), np.float32)
    dtypes.to_torch(view, "FP32")
    assert not [w for w in recwarn if "not writable" in str(w.message)]
