"""Host <-> device copies around one forward pass on a CUDA device.

Inputs go up from pinned (page-locked) host memory with `non_blocking=True`, so the
copy is a DMA the forward's kernels queue behind instead of a synchronous staging copy
by the driver; a batch concatenated by the batcher is already pinned (`pinned_cat`), a
lone request is staged into pinned memory once. All outputs of the pass come back in
ONE device-to-host copy into one pinned buffer (packed side by side on the device,
each at an aligned offset), then are handed out as views of it: one copy per batch,
not one per output or per request. Pinned buffers come from torch's caching host
allocator, which reuses them once their copies have finished.

On the CPU every function here is the identity (or a plain `torch.cat`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ALIGN = 64  # bytes: every packed output starts here, so each view has its dtype's alignment

Layout = list[tuple[int, int, torch.dtype, tuple[int, ...]]]  # (offset, nbytes, dtype, shape)


def pinned_cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat on the CPU, written straight into pinned memory (the batch that goes up)."""
    rows = sum(int(t.shape[0]) for t in tensors)
    first = tensors[0]
    out = torch.empty((rows, *first.shape[1:]), dtype=first.dtype, pin_memory=True)
    return torch.cat(list(tensors), out=out)


def to_device(inputs: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU inputs -> `device`, each copied from pinned memory without blocking the host.
    Call inside the version's stream; the stream's synchronize ends the pass."""
    out = []
    for t in inputs:
        if t.device.type == "cpu" and not t.is_pinned():
            t = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        out.append(t.to(device, non_blocking=True))
    return out


def pack(outs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Layout]:
    """Tensors on one device -> one uint8 buffer on that device holding them all."""
    layout: Layout = []
    total = 0
    for o in outs:
        nbytes = o.numel() * o.element_size()
        layout.append((total, nbytes, o.dtype, tuple(o.shape)))
        total += -(-nbytes // ALIGN) * ALIGN
    flat = torch.empty(total, dtype=torch.uint8, device=outs[0].device)
    for o, (off, nbytes, _dt, _shape) in zip(outs, layout):
        if nbytes:
            flat[off:off + nbytes].copy_(o.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat, layout


def unpack(flat: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """The tensors `pack` put into `flat`, as views of it (no copy)."""
    return [flat[off:off + nbytes].view(dt).view(shape) for off, nbytes, dt, shape in layout]


def to_host(outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs -> pinned CPU tensors in one non-blocking copy; valid once the stream has
    synchronized. Outputs already on the CPU, or spread over devices, keep the old way."""
    dev = outs[0].device if outs else None
    if dev is None or dev.type != "cuda" or any(o.device != dev for o in outs):
        return [o.to("cpu", non_blocking=True) if o.device.type != "cpu" else o for o in outs]
    if len(outs) == 1:
        o = outs[0]
        return [torch.empty(o.shape, dtype=o.dtype, pin_memory=True).copy_(o, non_blocking=True)]
    flat, layout = pack(outs)
    host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    return unpack(host, layout)
