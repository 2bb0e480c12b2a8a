"""The YAML config file: load errors, comment-preserving round trip, atomic persist."""

import os

import pytest

import router.configfile as configfile
from router import (
    RouteConfig,
    RoutingError,
    load_config_file,
    persist_config_file,
)

TEXT = """\
# splitserve configuration
server:
  host: 127.0.0.1   # never 0.0.0.0 by default
  port: 8500

models:
  # image classifier
  resnet:
    labels:
      stable: 1   # the version we trust
      canary: 2
    weights:
      stable: 90  # most of the traffic
      canary: 10
    sticky: {header: x-user-id}
  bert:
    weights: {"3": 1}
# end of file
"""


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "splitserve.yaml"
    p.write_text(TEXT)
    return p


def test_load(path):
    configs = load_config_file(path)
    assert list(configs) == ["resnet", "bert"]
    assert configs["resnet"].to_json() == {
        "labels": {"stable": 1, "canary": 2},
        "weights": {"stable": 90, "canary": 10},
        "sticky": {"header": "x-user-id"},
    }
    assert dict(configs["bert"].weights) == {3: 1}


def test_missing_file(tmp_path):
    with pytest.raises(RoutingError) as info:
        load_config_file(tmp_path / "nope.yaml")
    assert info.value.kind == "missing" and "nope.yaml" in info.value.message
    assert load_config_file(tmp_path / "nope.yaml", missing_ok=True) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [\n", "not valid YAML: while parsing a flow node"),
        ("models:\n  a: {}\n  a: {}\n", "duplicate key"),
        ("- 1\n", "expected a mapping at the top level, got"),
        ("models: [1]\n", "models: expected a mapping of model -> routing config"),
        ("models:\n  m:\n    weights: {x: 1}\n", "models.m: weights.x: weight key 'x' is not a defined label"),
        ("models:\n  m: {labels: {a: 0}}\n  n: {shadow: 1}\n", "models.m: labels.a"),
    ],
)
def test_invalid_files(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(RoutingError) as info:
        load_config_file(p)
    assert info.value.kind == "invalid"
    assert str(p) in info.value.message and message in info.value.message


def test_all_model_faults_reported(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("models:\n  m: {labels: {a: 0}}\n  n: {shadow: 1}\n")
    with pytest.raises(RoutingError) as info:
        load_config_file(p)
    assert "models.m: labels.a" in info.value.message and "models.n: shadow" in info.value.message


def test_empty_or_modelless_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("# nothing yet\n")
    assert load_config_file(p) == {}
    p.write_text("server: {port: 1}\n")
    assert load_config_file(p) == {}


def test_persist_one_model_keeps_comments_and_other_keys(path):
    new = RouteConfig.from_json(
        {
            "labels": {"stable": 1, "canary": 2},
            "weights": {"stable": 80, "canary": 20},
            "sticky": {"header": "x-user-id"},
        }
    )
    persist_config_file(path, "resnet", new)
    text = path.read_text()
    assert text == TEXT.replace("stable: 90", "stable: 80").replace("canary: 10", "canary: 20")
    assert load_config_file(path)["resnet"] == new


def test_persist_add_and_remove_models(path):
    persist_config_file(path, "gpt", RouteConfig.from_json({"labels": {"prod": 4}, "weights": {"4": 1}}))
    persist_config_file(path, "bert", None)
    text = path.read_text()
    for kept in (
        "# splitserve configuration",
        "host: 127.0.0.1   # never 0.0.0.0 by default",
        "# image classifier",
        "stable: 1   # the version we trust",
        "# end of file",
    ):
        assert kept in text
    assert "bert" not in text
    configs = load_config_file(path)
    assert list(configs) == ["resnet", "gpt"]
    assert configs["gpt"].to_json() == {"labels": {"prod": 4}, "weights": {"4": 1}}
    assert "server:\n  host: 127.0.0.1" in text  # the top-level order is kept


def test_persist_creates_a_missing_file(tmp_path):
    p = tmp_path / "new.yaml"
    config = RouteConfig.from_json({"weights": {"1": 1}, "shadow": {"target": 1, "percent": 2.5}})
    persist_config_file(p, "m", config)
    assert load_config_file(p) == {"m": config}
    assert oct(p.stat().st_mode & 0o777) == oct(0o644)



def test_persist_refuses_to_overwrite_an_unparsable_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("models: [\n")
    with pytest.raises(RoutingError, match="not valid YAML"):
        persist_config_file(p, "m", RouteConfig())
    assert p.read_text() == "models: [\n"


def test_persist_keeps_file_mode(path):
    os.chmod(path, 0o600)
    persist_config_file(path, "bert", None)
    assert path.stat().st_mode & 0o777 == 0o600


def _leftovers(folder):
    """Files beside the config other than the writers' lock (which stays by design)."""
    return sorted(n for n in os.listdir(folder) if n not in ("splitserve.yaml", ".splitserve.yaml.lock"))


def test_crash_midway_through_the_write_leaves_the_old_file(path, monkeypatch):
    # The temp file gets half the bytes, then the "crash".
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError("disk on fire")

    monkeypatch.setattr(configfile.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="disk on fire"):
        persist_config_file(path, "bert", None)
    assert path.read_text() == TEXT
    assert _leftovers(path.parent) == []  # the half-written temp file is removed


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_crash_before_the_rename_leaves_the_old_file(path, monkeypatch, step):
    def boom(*args):
        raise OSError(f"crash at {step}")

    monkeypatch.setattr(configfile.os, step, boom)
    with pytest.raises(OSError, match=f"crash at {step}"):
        persist_config_file(path, "bert", None)
    assert path.read_text() == TEXT
    assert _leftovers(path.parent) == []


def test_write_goes_through_temp_file_and_rename(path, monkeypatch):
    calls = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(configfile.os, "replace", lambda a, b: (calls.append(("replace", a, b)), real_replace(a, b)))
    monkeypatch.setattr(configfile.os, "fsync", lambda fd: (calls.append(("fsync",)), real_fsync(fd)))
    persist_config_file(path, "bert", None)
    kinds = [c[0] for c in calls]
    assert kinds == ["fsync", "replace", "fsync"]  # file data, rename, then the folder
    src, dst = calls[1][1], calls[1][2]
    assert os.path.dirname(src) == str(path.parent) and dst == str(path)


def test_persist_through_a_symlink_keeps_the_link(tmp_path, path):
    link = tmp_path / "link.yaml"
    link.symlink_to(path)
    persist_config_file(link, "bert", None)
    assert link.is_symlink()
    assert "bert" not in path.read_text()


def _hammer(path: str, model: str, n: int, start, out) -> None:
    """One writer process: PUT-like edits of its own model only, reading back after each."""
    start.wait(60)
    reverted = 0
    for i in range(1, n + 1):
        persist_config_file(path, model, RouteConfig.from_json({"weights": {"1": i}}))
        if load_config_file(path)[model].weights != {1: i}:
            reverted += 1  # another writer put back an older copy of our entry
    out.put((model, reverted))


def test_writers_in_two_processes_never_lose_each_others_edits(path):
    # The workers of `--workers N` persist routing PUTs to one file. Each writer's
    # read-modify-write holds the lock and re-reads the file, so an edit of model A never
    # writes back a stale copy of model B (last writer wins only within one model).
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start, out, n = ctx.Event(), ctx.Queue(), 150
    procs = [ctx.Process(target=_hammer, args=(str(path), m, n, start, out)) for m in ("resnet", "bert")]
    for p in procs:
        p.start()
    start.set()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert results == {"resnet": 0, "bert": 0}, f"entries reverted by the other writer: {results}"
    configs = load_config_file(path)
    assert configs["resnet"].weights == {1: n} and configs["bert"].weights == {1: n}
    assert "port: 8500" in path.read_text() and (path.parent / f".{path.name}.lock").exists()
