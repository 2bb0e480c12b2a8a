"""README "Your own model": its code blocks (marked `<!-- readme-test: own-model -->`) run
as written in a fresh folder; the three models they write serve a batch of three rows
with the same answers; two messages of its error table are what the server says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from runtime.types import VersionState

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- readme-test: own-model -->"
ROWS = np.linspace(-1, 1, 48, dtype=np.float32).reshape(3, 16)
# Test-only: the two mistakes the error table starts with, made on purpose.
MISTAKES = '''
(repo / "scorer_static" / "1").mkdir(parents=True)
torch.export.save(torch.export.export(model, (torch.randn(1, 16),)), str(repo / "scorer_static" / "1" / "model.pt2"))
(repo / "weights_only" / "1").mkdir(parents=True)
shutil.copy(repo / "scorer_st" / "1" / "model.safetensors", repo / "weights_only" / "1")
'''


def blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(re.escape(MARK) + r"\n```python\n(.*?)```", text, re.S)


def infer(http, model: str, rows=ROWS):
    return http.post(f"/v2/models/{model}/infer", json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}]})


def test_the_sections_code_runs_as_written_and_its_models_serve_batches(tmp_path, serve):
    code = blocks()
    assert len(code) == 4, "README's 'Your own model' lost a marked block"
    script = "\n".join(code) + "\nimport shutil\n" + MISTAKES
    (tmp_path / "own_model.py").write_text(script, encoding="utf-8")
    r = subprocess.run([sys.executable, "own_model.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    repo = tmp_path / "model_repository"
    srv = serve(repo)
    models = ("scorer_pt2", "scorer_st", "scorer_ts")
    assert srv.wait_for(lambda: all(srv.available(m) == [1] for m in models), 120)
    with httpx.Client(base_url=srv.http, timeout=30) as http:
        answers = []
        for m in models:
            resp = infer(http, m)
            assert resp.status_code == 200, (m, resp.text)
            out = resp.json()["outputs"][0]
            assert out["shape"] == [3, 4], (m, out)
            answers.append(np.asarray(out["data"], dtype=np.float32).reshape(3, 4))
        for a in answers[1:]:
            np.testing.assert_allclose(a, answers[0], rtol=1e-5, atol=1e-6)  # one network, three packagings

        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        resp = infer(http, "scorer_static")
        assert resp.status_code == 400
        said = resp.json()["error"]
        assert said == "input 'x': shape [3, 16] does not match the model's [1, 16] (-1 = any size)"
        assert f"`{said}`" in readme
        assert srv.wait_state("weights_only", 1, VersionState.FAILED)
        index = {row["name"]: row for row in http.post("/v2/repository/index", json={}).json()}
        reason = index["weights_only"]["reason"]
        assert reason == "model.safetensors needs a model.py in the version or model folder", index["weights_only"]
        assert f"`{reason}`" in readme
