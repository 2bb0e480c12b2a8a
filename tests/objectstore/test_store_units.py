"""Pure parts of the object-storage repository: key grouping, the LIST rate limit, error
lines, URL checks and the CLI's --repository URL."""

from __future__ import annotations

import random

import pytest

from runtime.repository.mirror import group, listed_problem, signature
from runtime.repository.objectstore import ObjectInfo, RateLimit, check_url, describe, is_store_url

pytestmark = pytest.mark.unit  # starts no server process, binds no socket


def obj(key: str, size: int = 1, etag: str = "e") -> ObjectInfo:
    return ObjectInfo(key, size, etag, 0.0)


def test_group_splits_model_files_and_versions_and_skips_what_the_repository_ignores():
    keys = ["mlp/model.yaml", "mlp/model.py", "mlp/1/model.pt2", "mlp/1/sub/extra.bin",
            "mlp/2/model.safetensors", "mlp/.3.tmp/model.pt2", "mlp/3.tmp/model.pt2",
            "mlp/007/model.pt2", "mlp/latest/model.pt2", "README.md", ".hidden/1/model.pt2",
            "mlp/1/../../etc/passwd", "mlp/1/.partial", "mlp//model.pt2", "mlp/1/"]
    units, skipped = group([obj(k) for k in keys])
    assert sorted(units) == ["mlp", "mlp/1", "mlp/2"]
    assert sorted(units["mlp"]) == ["model.py", "model.yaml"]
    assert sorted(units["mlp/1"]) == ["model.pt2", "sub/extra.bin"]
    assert sorted(skipped) == sorted(set(keys) - {"mlp/model.yaml", "mlp/model.py", "mlp/1/model.pt2",
                                                  "mlp/1/sub/extra.bin", "mlp/2/model.safetensors"})


def test_listing_completeness_needs_a_model_file_and_an_architecture_for_safetensors():
    assert "no model file" in listed_problem({"notes.txt": obj("x")}, {})
    assert "model.py" in listed_problem({"model.safetensors": obj("x")}, {})
    assert listed_problem({"model.safetensors": obj("x")}, {"model.py": obj("y")}) is None
    assert listed_problem({"model.safetensors": obj("x"), "model.py": obj("y")}, {}) is None
    assert listed_problem({"model.pt2": obj("x")}, {}) is None


def test_signature_changes_with_size_or_etag_only():
    a = {"model.pt2": obj("m/1/model.pt2", 10, "a")}
    assert signature(a) == signature({"model.pt2": obj("m/1/model.pt2", 10, "a")})
    assert signature(a) != signature({"model.pt2": obj("m/1/model.pt2", 10, "b")})
    assert signature(a) != signature({"model.pt2": obj("m/1/model.pt2", 11, "a")})


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_rate_limit_is_a_sliding_window():
    clock = Clock()
    lim = RateLimit(3, clock=clock)
    assert lim.wait_s() == 0
    lim.take(1)
    clock.t += 10
    lim.take(2)
    assert lim.wait_s() == pytest.approx(50.0)  # the first request leaves the window at +60
    assert lim.wait_s(2) == pytest.approx(60.0)
    clock.t += 50
    assert lim.wait_s() == 0
    assert lim.wait_s(2) == pytest.approx(10.0)


def test_rate_limit_never_admits_more_than_n_in_any_window():
    clock = Clock()
    lim = RateLimit(5, clock=clock)
    rng = random.Random(7)
    taken = []
    for _ in range(2000):
        clock.t += rng.expovariate(1.0)
        if lim.wait_s() == 0:
            lim.take()
            taken.append(clock.t)
    assert len(taken) > 50
    for i, t in enumerate(taken):
        assert sum(1 for u in taken[i:] if u < t + 60) <= 5


def test_describe_gives_the_store_code_and_message_on_one_line():
    text = ("Generic S3 error: Error performing list request: Error performing GET "
            "http://127.0.0.1:1/b?list-type=2 in 2ms - Server returned non-2xx status code: 403 "
            "Forbidden: <?xml version=\"1.0\"?>\n<Error><Code>InvalidAccessKeyId</Code><Message>The "
            "AWS Access Key Id you provided does not exist in our records.</Message></Error>\n\n"
            "Debug source:\nGeneric {\n store: \"S3\" }")
    line = describe(Exception(text))
    assert line == ("InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our "
                    "records. (HTTP 403 Forbidden)")
    down = describe(Exception("Generic S3 error: Error performing list request: Error performing GET "
                              "http://h/b in 6ms - HTTP error: error sending request\n\nDebug source:\n..."))
    assert "\n" not in down and down.endswith("HTTP error: error sending request")


def test_urls():
    assert is_store_url("s3://bucket/prefix") and is_store_url("gs://b") and is_store_url("az://acct/c")
    assert not is_store_url("model_repository") and not is_store_url("/srv/models")
    with pytest.raises(ValueError, match="unsupported repository URL"):
        check_url("ftp://host/models")
    with pytest.raises(ValueError, match="names no bucket"):
        check_url("s3:///models")


def test_cli_takes_a_store_url_as_the_repository():
    from runtime.cli.main import CliError, _parser, build_settings
    s = build_settings(_parser().parse_args(["serve", "--repository", "s3://bkt/models/prod",
                                             "--config", "/dev/null"]))
    assert s.repository.url == "s3://bkt/models/prod"
    local = build_settings(_parser().parse_args(["serve", "--repository", "repo", "--config", "/dev/null"]))
    assert local.repository.url is None and str(local.repository.path) == "repo"
    with pytest.raises(CliError, match="unsupported repository URL"):
        build_settings(_parser().parse_args(["serve", "--repository", "ftp://h/m", "--config", "/dev/null"]))
