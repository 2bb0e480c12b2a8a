"""Pure pieces: version naming, completeness checks, version policy, model.yaml validation."""

from pathlib import Path

import pytest

from runtime.repository.modelspec import SpecError, parse_spec, read_spec
from runtime.lifecycle.policy import select_versions
from runtime.repository.scan import is_version_name, root_ignored, safetensors_problem, scan_model

pytestmark = pytest.mark.unit  # starts no server process, binds no socket

SRC = "mlp/model.yaml"


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
    ("inputs: [{name: x, datatype: FLOAT99, shape: [1]}]", "inputs[0].datatype"),
    ("inputs: [{name: x, datatype: FP32, shape: [0]}]", "inputs[0].shape"),
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


@pytest.mark.parametrize("text,message", [
    ("max_batchsize: 8",
     "unknown field 'max_batchsize' in mlp/model.yaml; did you mean 'max_batch_size'?"),
    ("warmpu: true", "unknown field 'warmpu' in mlp/model.yaml; did you mean 'warmup'?"),
    ("version-policy: all",
     "unknown field 'version-policy' in mlp/model.yaml; did you mean 'version_policy'?"),
    ("batching: {enabled: true, max_queue_delay: 3}",
     "unknown field 'batching.max_queue_delay' in mlp/model.yaml; "
     "did you mean 'batching.max_queue_delay_us'?"),
    ("batching: {max_queue_delay_m: 3}",  # an accepted alias is a candidate too
     "unknown field 'batching.max_queue_delay_m' in mlp/model.yaml; "
     "did you mean 'batching.max_queue_delay_ms'?"),
    # the misspelt key's "missing" twin is not reported a second time
    ("inputs: [{name: x, datatyp: FP32, shape: [1]}]",
     "unknown field 'inputs[0].datatyp' in mlp/model.yaml; did you mean 'inputs[0].datatype'?"),
    ("version_policy: {lastest: 2}",
     "unknown field 'version_policy.lastest' in mlp/model.yaml; did you mean 'version_policy.latest'?"),
    ("colour: red", "unknown field 'colour' in mlp/model.yaml; the fields are inputs, outputs, "
     "max_batch_size, device, warmup, version_policy, entry_point, kwargs, batching, "
     "load_timeout_s, max_queue_size, version_swap, execution"),
    ("device: tpu", "invalid 'device' in mlp/model.yaml: 'tpu' is not a device; "
     "expected auto, cpu, cuda or cuda:N"),
    ("max_batch_size: lots", "invalid 'max_batch_size' in mlp/model.yaml: 'lots'; expected an integer"),
    ("load_timeout_s: 0", "invalid 'load_timeout_s' in mlp/model.yaml: 0; expected a number > 0"),
    # one form of version_policy is judged, not all three at once
    ("version_policy: {latest: 0}",
     "invalid 'version_policy.latest' in mlp/model.yaml: 0; expected a number >= 1"),
    ("version_policy: newest", "invalid 'version_policy' in mlp/model.yaml: 'newest'; "
     "expected all, {latest: N} or {specific: [N, ...]}"),
    ("inputs: [{name: x, shape: [1]}]",
     "missing field 'inputs[0].datatype' in mlp/model.yaml (required)"),
    ("warmup: yes please", "invalid 'warmup' in mlp/model.yaml: 'yes please'; expected true or false"),
    ("- 1", "mlp/model.yaml must be a mapping of fields (inputs, max_batch_size, ...), not a list"),
    ("a: [1\nb: 2", "invalid YAML in mlp/model.yaml at line 2: expected ',' or ']', but got ':'"),
])
def test_model_yaml_errors_are_one_line_in_our_words(text, message):
    with pytest.raises(SpecError) as e:
        parse_spec(text, SRC)
    assert str(e.value) == message


def test_several_model_yaml_problems_share_one_line():
    with pytest.raises(SpecError) as e:
        parse_spec("a: 1\nb: 2\nc: 3\nd: 4\nwarmup: 3", SRC)
    msg = str(e.value)
    assert "\n" not in msg and msg.count("the fields are") == 1, msg
    assert msg.startswith("invalid 'warmup' in mlp/model.yaml: 3; expected true or false; "
                          "unknown field 'a'; the fields are inputs,")
    assert msg.endswith("; unknown field 'b' (and 2 more)")
    for pydantic_words in ("Extra inputs", "Input should", "Field required", "Value error"):
        assert pydantic_words not in msg


def test_read_spec_names_the_file_relative_to_the_repository(tmp_path):
    m = tmp_path / "repo" / "mlp"
    m.mkdir(parents=True)
    (m / "model.yaml").write_text("max_batchsize: 8\n")
    with pytest.raises(SpecError) as e:
        read_spec(m)
    assert str(e.value).startswith("unknown field 'max_batchsize' in mlp/model.yaml;")
    assert str(tmp_path) not in str(e.value)
    (m / "model.yaml").write_bytes(b"\xff\xfe bad")
    with pytest.raises(SpecError) as e:
        read_spec(m)
    assert str(e.value).startswith("mlp/model.yaml could not be read as UTF-8 text")
    assert str(tmp_path) not in str(e.value)


def test_scan_says_what_it_ignores_and_why(tmp_path, version_cache):
    import shutil
    m = tmp_path / "mlp"
    m.mkdir()
    (m / "model.py").write_text((Path(__file__).parents[2] / "model_repository/mlp/model.py").read_text())
    (m / "model.yml").write_text("device: cpu\n")
    (m / "notes.txt").write_text("todo")
    (m / "model.pt2").write_bytes(b"")
    (m / "3").write_text("a file named like a version")
    for name in ("v7", "007", ".tmp-5", ".4.tmp", "__pycache__"):  # dot names: publishing
        (m / name).mkdir()
    shutil.copytree(version_cache / "pt2_2", m / "2")
    shutil.copy(version_cache / "ts4" / "model.pt", m / "2" / "model.pt")
    (m / "2" / "README.md").write_text("v2")
    (m / "8").mkdir()
    (m / "8" / "model.pth").write_bytes(b"weights")
    (m / "9").mkdir()
    (m / "10").mkdir()
    (m / "10" / "model.pt2").symlink_to(version_cache / "pt2_2" / "model.pt2")  # out of the repo
    folder = scan_model(m)
    assert sorted(folder.versions) == [2, 8, 9, 10]
    assert dict(folder.ignored) == {
        "007": "not a version number: version folders are named 1, 2, ... without leading zeros, from 1",
        "v7": "not a version number: version folders are named 1, 2, ...",
        "3": "a file, not a folder: version folders are named 1, 2, ...",
        "notes.txt": "not a file the runtime reads: a model folder holds model.yaml, model.py "
                     "and version folders 1, 2, ...",
        "model.yml": "not a file the runtime reads; did you mean 'model.yaml'?",
        "model.pt2": "a model file outside a version folder: move it into one (e.g. 1/model.pt2)",
        "2/model.pt": "not loaded: model.pt2 is (the first of model.pt2, model.safetensors, "
                      "model.pt present)",
        "2/README.md": "not read: a version folder holds model.pt2, model.py and warmup.json",
    }
    assert folder.versions[2].incomplete is None and folder.versions[2].format == "model.pt2"
    assert folder.versions[8].format is None
    assert folder.versions[8].incomplete == (
        "no loadable file in mlp/8/: found model.pth; expected one of "
        "model.pt2, model.safetensors (+ model.py), model.pt")
    assert folder.versions[9].incomplete.startswith("no loadable file in mlp/9/: found nothing;")
    assert folder.versions[10].incomplete == (
        "no loadable file in mlp/10/: found nothing (model.pt2: a symlink out of the "
        "repository, not followed); expected one of model.pt2, model.safetensors (+ model.py), "
        "model.pt")


def test_root_entries_that_are_not_model_folders_say_what_is_expected(tmp_path):
    (tmp_path / "mlp").mkdir()
    (tmp_path / "model.pt").write_bytes(b"weights")
    (tmp_path / "config.yaml").write_text("models: {}\n")
    (tmp_path / "model.yaml").write_text("device: cpu\n")
    (tmp_path / "-x").mkdir()
    (tmp_path / "other").symlink_to(tmp_path / "mlp")  # its model scan reports it
    for name in (".mlp.tmp", "__pycache__", "notes.txt~", "model.pt.part", ".DS_Store"):
        (tmp_path / name).write_text("on the way")  # hidden and temporary names: silent
    layout = "models are folders <root>/<model>/<version>/"
    assert dict(root_ignored(tmp_path)) == {
        "model.pt": f"a model file at the repository root: {layout} (e.g. mymodel/1/model.pt)",
        "config.yaml": f"not a model folder: {layout}",
        "model.yaml": f"a model folder's file at the repository root: {layout}, model.yaml in <model>/",
        "-x": f"not a model name: {layout}, a model named with letters, digits, '_', '.' or '-' "
              "(starting with a letter or digit, at most 128)",
    }
