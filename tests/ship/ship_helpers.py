"""A served repository with two versions of the bundled mlp and the given routing."""

from __future__ import annotations

import json

from runtime.types import VersionState


def serve_routed(make_repo, serve, tmp_path, routing: dict, token: str):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(json.dumps({"models": {"mlp": routing}}))
    s = serve(repo, cfg, token=token)
    assert s.wait_state("mlp", 2, VersionState.AVAILABLE)
    return s
