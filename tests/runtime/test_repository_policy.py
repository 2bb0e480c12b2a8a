"""Pure pieces: version naming, completeness checks, version policy, model.yaml validation."""

from pathlib import Path

import pytest

from runtime.modelspec import SpecError, parse_spec
from runtime.policy import select_versions
from runtime.repository import is_version_name, safetensors_problem, scan_model


@pytest.mark.parametrize("name,ok", [("1", True), ("12", True), ("007", False), ("0", False),
                                     ("2.tmp", False), (".3", False), ("latest", False), ("-1", False)])
def test_version_names(name, ok):
    assert is_version_name(name) is ok


@pytest.mark.parametrize("policy,present,want", [
    ("{latest: 1}", [1, 2, 3], {3}),
    ("{latest: 2}", [1, 2, 3], {2, 3}),
    ("{latest: 5}", [1, 3], {1, 3}),
    ("all", [1, 2, 3], {1, 2, 3}),
    ("{specific: [1, 3]}", [1, 2, 3], {1, 3}),
    ("{specific: [4]}", [1, 2], set()),
    ("{latest: 1}", [], set()),
])
def test_select_versions(policy, present, want):
    assert select_versions(parse_spec(f"version_policy: {policy}"), present) == want


@pytest.mark.parametrize("text,field", [
    ("device: gpu", "device"),
    ("version_policy: {latest: 0}", "version_policy"),
    ("max_batch_size: -1", "max_batch_size"),
    ("inputs: [{name: x, datatype: FLOAT99, shape: [1]}]", "inputs.0.datatype"),
    ("inputs: [{name: x, datatype: FP32, shape: [0]}]", "inputs.0.shape"),
    ("warmpu: true", "warmpu"),
    ("[1, 2", "invalid YAML"),
])
def test_bad_model_yaml_names_the_field(text, field):
    with pytest.raises(SpecError) as e:
        parse_spec(text)
    assert field in str(e.value)


def test_scan_ignores_non_version_folders_and_sees_truncation(tmp_path, version_cache):
    import shutil
    m = tmp_path / "m"
    m.mkdir()
    (m / "model.py").write_text((Path(__file__).parents[2] / "model_repository/mlp/model.py").read_text())
    for name in ("007", "2.tmp", ".3", "latest"):
        shutil.copytree(version_cache / "st1", m / name)
    shutil.copytree(version_cache / "st1", m / "4")
    folder = scan_model(m)
    assert list(folder.versions) == [4]
    assert folder.versions[4].incomplete is None
    f = m / "4" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert "truncated" in safetensors_problem(f)
    again = scan_model(m)
    assert again.versions[4].incomplete and again.versions[4].fingerprint != folder.versions[4].fingerprint
