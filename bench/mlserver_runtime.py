"""MLServer custom runtime for the benchmark: the same MLP, built from the same files.

Imported by MLServer (installed by bench/run.py into bench/.tools/mlserver-venv only, never
a project dependency). `parameters.uri` is the version folder (model.safetensors, with
model.py and model.yaml beside it or one level up), exactly what splitserve loads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import yaml
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from safetensors.torch import load_file


class TorchMLP(MLModel):
    async def load(self) -> bool:
        version_dir = Path(self.settings.parameters.uri)
        model_dir = version_dir.parent
        spec = yaml.safe_load((model_dir / "model.yaml").read_text()) or {}
        arch = version_dir / "model.py"
        if not arch.exists():
            arch = model_dir / "model.py"
        mspec = importlib.util.spec_from_file_location("mlserver_bench_arch", arch)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        m = getattr(mod, spec.get("entry_point", "build_model"))(**spec.get("kwargs", {}))
        m.load_state_dict(load_file(str(version_dir / "model.safetensors")))
        self._model = m.eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        with torch.inference_mode():
            y = self._model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output(name="output", payload=y)])
