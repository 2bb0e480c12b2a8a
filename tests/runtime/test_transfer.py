"""runtime/execution/transfer.py: one packed device-to-host copy of all outputs, pinned uploads.

The packing runs on any device, so its layout is checked here on the CPU; the CUDA
tests (marked `cuda`, skipped without a GPU) check the real copies: outputs come back
pinned, from one buffer, equal to the CPU answer; batches are concatenated pinned.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import MLP_YAML, expected_output
from runtime.execution import transfer
from runtime.execution.batcher import run_batch

def _mixed(device="cpu"):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 5, generator=g).to(device),
            torch.tensor([True, False, True]).to(device),
            torch.arange(7, dtype=torch.int64).to(device),
            torch.randn(2, 3, generator=g).to(torch.bfloat16).to(device),
            torch.tensor(2.5, dtype=torch.float64).to(device),  # 0-dim
            torch.empty(0, 4, dtype=torch.float16).to(device),  # no elements
            torch.randn(4, 6, generator=g).to(device).t(),  # not contiguous
            torch.arange(3, dtype=torch.uint8).to(device)]


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_pack_then_unpack_gives_every_tensor_back_as_views_of_one_buffer():
    outs = _mixed()
    flat, layout = transfer.pack(outs)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert all(off % transfer.ALIGN == 0 for off, *_ in layout)
    back = transfer.unpack(flat, layout)
    for a, b in zip(outs, back):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
        if b.numel():
            assert b.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_on_the_cpu_outputs_pass_through_untouched():
    outs = _mixed()
    assert all(a is b for a, b in zip(transfer.to_host(outs), outs))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_cuda_outputs_come_back_pinned_in_one_buffer():
    outs = _mixed("cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        host = transfer.to_host(outs)
        s.synchronize()
    assert all(h.device.type == "cpu" and h.is_pinned() for h in host)
    assert len({h.untyped_storage().data_ptr() for h in host if h.numel()}) == 1
    for a, h in zip(outs, host):
        assert torch.equal(a.cpu(), h)
    one = transfer.to_host(outs[:1])
    torch.cuda.synchronize()
    assert one[0].is_pinned() and torch.equal(one[0], outs[0].cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_cuda_inputs_go_up_from_pinned_memory_and_batches_concatenate_pinned():
    x = torch.randn(4, 64)
    up = transfer.to_device([x], torch.device("cuda"))
    torch.cuda.synchronize()
    assert up[0].is_cuda and torch.equal(up[0].cpu(), x)
    seen = []

    def forward(inputs):
        seen.append(inputs[0].is_pinned())
        return [inputs[0] * 2]
    parts = [[torch.randn(1, 64)] for _ in range(3)]
    key = ((torch.float32, (64,), torch.device("cpu")),)
    res = run_batch(forward, parts, key, 4, pin=True)  # 3 rows padded to 4
    assert seen == [True]
    for p, r in zip(parts, res):
        assert torch.equal(r[0], p[0] * 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batching", [False, True])
def test_cuda_server_answers_equal_the_cpu_answer(make_repo, serve, batching):
    import httpx
    yaml = MLP_YAML.replace("device: auto", "device: cuda")
    if batching:
        yaml = yaml.replace("enabled: false", "enabled: true")
    srv = serve(make_repo({"mlp": {1: "st1"}}, yaml={"mlp": yaml}))
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    r = httpx.post(srv.http + "/v2/models/mlp/infer", timeout=30, json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [3, 64], "data": x.ravel().tolist()}]})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(3, 8)
    np.testing.assert_allclose(got, expected_output(1, torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
