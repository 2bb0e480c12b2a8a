"""The mirror against a real S3-compatible server: what reaches the cache folder, when,
and what never does."""

from __future__ import annotations

import json

import pytest

from runtime.repository.mirror import MANIFEST, Mirror
from s3fixtures import bucket, publish, s3_server  # noqa: F401 - fixtures
from runtime.repository.objectstore import StoreError
from runtime.config.settings import StoreSettings

EMPTY_ZIP = b"PK\x05\x06" + b"\0" * 18  # a complete (empty) archive: passes the zip check


def mirror_of(bucket, tmp_path, prefix="models", **kw) -> Mirror:
    s = StoreSettings(cache_dir=tmp_path / "cache", quiet_s=kw.pop("quiet_s", 0.0),
                      poll_interval_s=0.1, max_lists_per_minute=1000, **kw)
    return Mirror(bucket.url(prefix), s)


def files_of(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_first_sync_mirrors_complete_versions_only(bucket, publish, tmp_path, version_cache):
    publish("mlp", 1, "st1")
    publish("mlp", 2, "pt2_2")
    bucket.put("models/mlp/3/notes.txt", b"an upload that never completes")
    bucket.put("models/mlp/.4.tmp/model.pt2", (version_cache / "pt2_2" / "model.pt2"))
    bucket.put("models/other-prefix-file.txt", b"ignored")
    m = mirror_of(bucket, tmp_path)
    m.first_sync()
    c = m.cache_dir
    assert files_of(c / "mlp") == ["1/model.safetensors", "2/model.pt2", "model.py", "model.yaml"]
    assert (c / "mlp/1/model.safetensors").read_bytes() == (version_cache / "st1/model.safetensors").read_bytes()
    assert m.figures.versions == {"mirrored": 2, "pending": 0, "incomplete": 1}
    assert m.figures.objects_fetched == 4 and m.figures.up == 1
    assert m.figures.bytes_fetched == sum((c / "mlp" / f).stat().st_size for f in files_of(c / "mlp"))
    doc = json.loads((c / MANIFEST).read_text())
    assert doc["url"] == bucket.url() and sorted(doc["units"]) == ["mlp", "mlp/1", "mlp/2"]
    assert not list((c / ".mirror-tmp").iterdir())


def test_a_changing_version_waits_for_a_quiet_listing(bucket, publish, tmp_path):
    publish("mlp", 1, "st1")
    m = mirror_of(bucket, tmp_path, quiet_s=0.0)
    m.first_sync()
    bucket.put("models/mlp/2/notes.txt", b"first file")
    assert m.sync_once() is True  # seen once: pending
    bucket.put("models/mlp/2/model.pt2", EMPTY_ZIP)
    assert m.sync_once() is True  # changed again: still pending
    assert not (m.cache_dir / "mlp/2").exists()
    assert m.sync_once() is False  # the same listing twice: mirrored
    assert files_of(m.cache_dir / "mlp/2") == ["model.pt2", "notes.txt"]


def test_quiet_s_is_measured_between_listings(bucket, publish, tmp_path):
    publish("mlp", 1, "st1")
    m = mirror_of(bucket, tmp_path, quiet_s=30.0)
    m._open_cache()
    from runtime.repository.objectstore import Store
    m._store = Store(m.url)
    assert m.sync_once() is True
    assert m.sync_once() is True  # two identical listings, but not 30 s apart
    assert not (m.cache_dir / "mlp").exists()


def test_deleting_a_version_removes_it_and_an_empty_model_goes_too(bucket, publish, tmp_path):
    publish("mlp", 1, "st1")
    publish("mlp", 2, "st2")
    m = mirror_of(bucket, tmp_path)
    m.first_sync()
    bucket.delete_prefix("models/mlp/2/")
    m.sync_once()
    assert (m.cache_dir / "mlp/2").exists()  # gone from one listing only: not yet
    m.sync_once()
    assert not (m.cache_dir / "mlp/2").exists() and (m.cache_dir / "mlp/1").is_dir()
    (m.cache_dir / "mlp/__pycache__").mkdir()  # what importing model.py leaves behind
    (m.cache_dir / "mlp/__pycache__/model.cpython-311.pyc").write_bytes(b"")
    bucket.delete_prefix("models/mlp/")
    m.sync_once()
    m.sync_once()
    assert not (m.cache_dir / "mlp").exists()
    assert json.loads((m.cache_dir / MANIFEST).read_text())["units"] == {}


def test_an_overwritten_version_is_replaced_whole_and_unchanged_files_are_not_fetched(
        bucket, publish, tmp_path, version_cache):
    publish("mlp", 1, "st1")
    bucket.put("models/mlp/1/notes.txt", b"kept")
    m = mirror_of(bucket, tmp_path)
    m.first_sync()
    notes = (m.cache_dir / "mlp/1/notes.txt").stat()
    fetched = m.figures.objects_fetched
    bucket.put("models/mlp/1/model.safetensors", version_cache / "st2" / "model.safetensors")
    m.sync_once()
    m.sync_once()
    assert m.figures.objects_fetched == fetched + 1
    assert (m.cache_dir / "mlp/1/model.safetensors").read_bytes() == \
        (version_cache / "st2/model.safetensors").read_bytes()
    assert (m.cache_dir / "mlp/1/notes.txt").stat().st_ino == notes.st_ino  # hard-linked


def test_a_restart_on_the_same_cache_fetches_nothing(bucket, publish, tmp_path):
    publish("mlp", 1, "st1")
    mirror_of(bucket, tmp_path).first_sync()
    again = mirror_of(bucket, tmp_path)
    again.first_sync()
    assert again.figures.objects_fetched == 0 and again.figures.versions["mirrored"] == 1
    (again.cache_dir / "mlp/1/model.safetensors").unlink()  # a damaged cache is repaired
    third = mirror_of(bucket, tmp_path)
    third.first_sync()
    assert third.figures.objects_fetched == 1 and (third.cache_dir / "mlp/1/model.safetensors").is_file()


def test_a_truncated_upload_is_never_mirrored_and_not_fetched_again(bucket, publish, tmp_path, version_cache):
    publish("mlp", 1, "st1")
    data = (version_cache / "st2" / "model.safetensors").read_bytes()
    bucket.put("models/mlp/2/model.safetensors", data[: len(data) // 2])
    m = mirror_of(bucket, tmp_path)
    m.first_sync()
    assert not (m.cache_dir / "mlp/2").exists()
    assert m.figures.errors["verify"] == 1
    fetched = m.figures.objects_fetched
    m.sync_once()
    m.sync_once()
    assert m.figures.objects_fetched == fetched and m.figures.versions["incomplete"] == 1
    bucket.put("models/mlp/2/model.safetensors", data)  # a new upload is tried again
    m.sync_once()
    m.sync_once()
    assert (m.cache_dir / "mlp/2/model.safetensors").stat().st_size == len(data)


def test_a_foreign_or_other_url_cache_folder_is_refused(bucket, publish, tmp_path):
    publish("mlp", 1, "st1")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "precious.txt").write_text("not the mirror's")
    with pytest.raises(StoreError, match="not empty and was not made by the mirror"):
        mirror_of(bucket, tmp_path).first_sync()
    assert (tmp_path / "cache" / "precious.txt").exists()
    (tmp_path / "cache" / "precious.txt").unlink()
    mirror_of(bucket, tmp_path).first_sync()
    with pytest.raises(StoreError, match="mirrors 's3://"):
        mirror_of(bucket, tmp_path, prefix="elsewhere").first_sync()


def test_a_failed_listing_changes_nothing(bucket, publish, tmp_path, s3_server):
    publish("mlp", 1, "st1")
    m = mirror_of(bucket, tmp_path)
    m.first_sync()
    before = files_of(m.cache_dir)
    s3_server.enforce_auth(True)
    assert m.sync_once() is False
    assert m.figures.up == 0 and m.figures.errors["list"] == 1
    assert files_of(m.cache_dir) == before
    s3_server.enforce_auth(False)
    m.sync_once()
    assert m.figures.up == 1


def test_missing_bucket_and_wrong_credentials_at_start_are_one_line_errors(bucket, tmp_path, s3_server):
    s = StoreSettings(cache_dir=tmp_path / "c1")
    with pytest.raises(StoreError) as e:
        Mirror("s3://no-such-bucket-here/models", s).first_sync()
    assert "NoSuchBucket" in str(e.value) and "\n" not in str(e.value)
    s3_server.enforce_auth(True)
    with pytest.raises(StoreError) as e:
        Mirror(bucket.url(), StoreSettings(cache_dir=tmp_path / "c2")).first_sync()
    assert "InvalidAccessKeyId" in str(e.value) and "HTTP 403" in str(e.value)
