"""An exported program's per-call pytree check is skipped only where the graph's own
guards still check shapes and our one call shape (the signature's tensors, positionally)
is the program's whole input structure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.lifecycle.loader import _guarded_flat, load_version
from runtime.repository.modelspec import ModelSpec

pytestmark = pytest.mark.unit  # starts no server process, binds no socket

BUNDLED = Path(__file__).resolve().parents[2] / "model_repository" / "mlp"


def test_bundled_export_skips_the_structure_check_and_still_guards_shapes():
    lm = load_version(BUNDLED / "2", "model.pt2", ModelSpec())
    assert lm.module.validate_inputs is False
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    fast = lm.forward([x])[0]
    lm.module.validate_inputs = True
    checked = lm.forward([x])[0]
    assert torch.equal(fast, checked)
    lm.module.validate_inputs = False
    with pytest.raises(Exception, match="64"):  # the in-graph guard names the dimension
        lm.forward([torch.randn(1, 65)])


class _Kw(torch.nn.Module):
    def forward(self, x, *, scale):
        return x * scale


class _Two(torch.nn.Module):
    def forward(self, x, y):
        return x + y


def test_other_input_structures_keep_the_check():
    kw = torch.export.export(_Kw(), (torch.randn(2, 3),), {"scale": torch.randn(2, 3)}).module()
    assert not _guarded_flat(kw, 1) and not _guarded_flat(kw, 2)
    two = torch.export.export(_Two(), (torch.randn(2, 3), torch.randn(2, 3))).module()
    assert _guarded_flat(two, 2)
    assert not _guarded_flat(two, 1)  # a signature that disagrees with the program
    assert not _guarded_flat(torch.nn.Linear(2, 2), 1)  # not an exported program
