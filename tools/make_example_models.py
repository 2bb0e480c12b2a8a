"""Writes example model versions: `python tools/make_example_models.py [--out DIR]`.

`--version-dir DIR [--seed N]` writes one new version of the example MLP (a
model.pt2, new weights) into DIR, ready to publish by rename (the README's A/B
walkthrough builds its version 3 this way).

The bundled repository was made by this script; tests and benchmarks call `write_*`
to build fresh versions (different seeds give different weights, so a test can tell
which version answered).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
ARCH = ROOT / "model_repository" / "mlp" / "model.py"


def _arch():
    spec = importlib.util.spec_from_file_location("_mlp_arch", ARCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_mlp(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _arch().build_model(**kwargs).eval()


def write_safetensors(version_dir: Path, seed: int, **kwargs) -> torch.nn.Module:
    version_dir.mkdir(parents=True, exist_ok=True)
    m = make_mlp(seed, **kwargs)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(version_dir / "model.safetensors"))
    return m


def write_pt2(version_dir: Path, seed: int, d_in: int = 64, **kwargs) -> torch.nn.Module:
    version_dir.mkdir(parents=True, exist_ok=True)
    m = make_mlp(seed, d_in=d_in, **kwargs)
    batch = torch.export.Dim("batch", min=1, max=65536)
    ep = torch.export.export(m, (torch.randn(2, d_in),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(version_dir / "model.pt2"))
    return m


def write_torchscript(version_dir: Path, seed: int, **kwargs) -> torch.nn.Module:
    version_dir.mkdir(parents=True, exist_ok=True)
    m = make_mlp(seed, **kwargs)
    torch.jit.script(m).save(str(version_dir / "model.pt"))
    return m


def write_model_folder(model_dir: Path, yaml_text: str | None = None) -> None:
    """A model folder with the architecture and (optionally) a model.yaml."""
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ARCH, model_dir / "model.py")
    src = ROOT / "model_repository" / "mlp" / "model.yaml"
    (model_dir / "model.yaml").write_text(yaml_text if yaml_text is not None else src.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--version-dir", type=Path, default=None,
                    help="write only one new version (model.pt2) into this folder")
    ap.add_argument("--seed", type=int, default=3, help="weights seed for --version-dir")
    args = ap.parse_args()
    if args.version_dir is not None:
        if args.version_dir.exists() and any(args.version_dir.iterdir()):
            raise SystemExit(f"make_example_models: {args.version_dir} is not empty")
        write_pt2(args.version_dir, seed=args.seed)
        print(f"wrote {args.version_dir}/model.pt2 (seed {args.seed})")
        return
    mdir = args.out / "mlp"
    if args.out.resolve() != (ROOT / "model_repository").resolve():
        write_model_folder(mdir)
    write_safetensors(mdir / "1", seed=1)
    write_pt2(mdir / "2", seed=2)
    print(f"wrote {mdir}/1 (safetensors) and {mdir}/2 (pt2)")


if __name__ == "__main__":
    main()
