"""The default config is made from the tracked template once, never overwritten."""

from __future__ import annotations

import pytest

from runtime.config.defaults import seed_default_config

pytestmark = pytest.mark.unit  # starts no server process, binds no socket


def test_seeds_from_the_template_only_when_the_default_is_missing(tmp_path):
    default, template = tmp_path / "configs" / "splitserve.yaml", tmp_path / "configs" / "t.yaml"
    template.parent.mkdir()
    assert seed_default_config(default, template) is False  # no template: nothing
    assert not default.exists()
    template.write_text("models: {}\n")
    assert seed_default_config(default, template) is True
    assert default.read_text() == "models: {}\n"
    default.write_text("models: {mlp: {labels: {stable: 3}}}\n")  # the server's edits
    assert seed_default_config(default, template) is False
    assert default.read_text() == "models: {mlp: {labels: {stable: 3}}}\n"
    assert sorted(p.name for p in default.parent.iterdir()) == ["splitserve.yaml", "t.yaml"]


def test_a_file_that_appears_meanwhile_is_kept(tmp_path, monkeypatch):
    import os

    default, template = tmp_path / "splitserve.yaml", tmp_path / "example.yaml"
    template.write_text("template\n")
    real_link = os.link

    def racing_link(src, dst):  # another server created it between the check and the link
        default.write_text("theirs\n")
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    assert seed_default_config(default, template) is False
    assert default.read_text() == "theirs\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.yaml", "splitserve.yaml"]
