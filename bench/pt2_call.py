"""One exported program's call, with and without torch.export's per-call pytree check
(runtime/lifecycle/loader.py turns it off where the graph's guards still check shapes): the bundled
mlp version 2 (model.pt2), batch 1, interleaved rounds, medians. Prints microseconds per
`LoadedModel.forward`. Usage: python bench/pt2_call.py [--rounds 8] [--calls 3000]"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from runtime.lifecycle.loader import load_version  # noqa: E402
from runtime.repository.modelspec import ModelSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=3000)
    a = ap.parse_args()
    lm = load_version(ROOT / "model_repository" / "mlp" / "2", "model.pt2", ModelSpec())
    x = torch.randn(1, 64)
    res: dict[bool, list[float]] = {True: [], False: []}
    for r in range(a.rounds):
        for checked in ((True, False) if r % 2 else (False, True)):
            lm.module.validate_inputs = checked
            for _ in range(200):
                lm.forward([x])
            t = time.perf_counter()
            for _ in range(a.calls):
                lm.forward([x])
            res[checked].append((time.perf_counter() - t) / a.calls * 1e6)
    for checked, name in ((True, "with the pytree check (torch's default)"), (False, "without (splitserve)")):
        print(f"{name}: median {statistics.median(res[checked]):.1f} us per call "
              f"(rounds: {', '.join(f'{v:.0f}' for v in res[checked])})")


if __name__ == "__main__":
    main()
