"""Like with like: every unbatched CPU version of a model runs on one path (inline or the
executor), chosen by a rule a user can read and shown per version; an inline forward
runs with one intra-op thread and gives the loop thread its own count back."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from conftest import MLP_YAML
from runtime.execution.runner import Runner
from runtime.lifecycle.manager import execution_rule
from runtime.repository.modelspec import parse_spec


def runner(name: str, forward_s: float | None, numel: int = 16, forward=None) -> Runner:
    return Runner(name, forward or (lambda xs: xs), ThreadPoolExecutor(1), sample_numel=numel,
                  forward_s=forward_s)


def test_one_slow_version_puts_every_version_on_the_executor():
    fast, slow = runner("version 1", 150e-6), runner("version 2", 250e-6)
    inline, why = execution_rule(None, [fast, slow], 200)
    assert not inline and why == "auto: version 2 forward 250 us > inline_forward_us=200"
    inline, why = execution_rule(None, [fast, runner("version 2", 160e-6)], 200)
    assert inline and why.startswith("auto: every version's forward <= inline_forward_us=200")
    assert execution_rule(None, [fast, runner("version 2", None)], 200)[0] is False  # never measured
    assert execution_rule(None, [fast], 0) == (False, "auto: repository.inline_forward_us is 0")


def test_model_yaml_decides_outright():
    slow = runner("version 1", 5.0)
    assert execution_rule(parse_spec("execution: inline"), [slow], 200) == (True, "execution: inline in model.yaml")
    fast = runner("version 1", 1e-6)
    assert execution_rule(parse_spec("execution: executor"), [fast], 200) == (False, "execution: executor in model.yaml")


def test_inline_forward_runs_with_one_thread_and_restores_the_loops_count():
    seen = []

    def forward(xs):
        seen.append(torch.get_num_threads())
        return xs

    r = runner("version 1", 1e-6, forward=forward)
    r.set_inline(True)
    assert r.execution == "inline"
    out = {}

    def loop_thread():
        torch.set_num_threads(2)
        asyncio.run(r.run([torch.zeros(1, 16)]))
        out["after"] = torch.get_num_threads()

    t = threading.Thread(target=loop_thread)
    t.start()
    t.join(30)
    assert seen == [1] and out["after"] == 2
    r.set_inline(False)
    assert r.execution == "executor"
    assert asyncio.run(r.run([torch.zeros(1, 16)])).outputs[0].shape == (1, 16)
    assert len(seen) == 2  # on the executor thread, with that thread's own count
    r.executor.shutdown()


def versions_execution(srv) -> tuple[dict, dict]:
    meta = httpx.get(f"{srv.http}/v2/models/mlp", timeout=10).json()
    summary = httpx.get(f"{srv.http}/v1/models/mlp/metrics", timeout=10).json()
    return meta.get("execution"), {v["version"]: v["execution"] for v in summary["versions"]}


def test_both_versions_share_one_path_shown_in_metadata_and_summary(make_repo, serve, tmp_path):
    yaml = MLP_YAML.replace("version_policy: {latest: 1}", "version_policy: {specific: [1, 2]}")
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}}, yaml={"mlp": yaml})
    srv = serve(repo, inline_forward_us=1e9)  # any measured forward qualifies
    assert srv.wait_for(lambda: len(srv.available("mlp")) == 2, 60)
    assert versions_execution(srv) == ({"1": "inline", "2": "inline"}, {"1": "inline", "2": "inline"})
    # model.yaml says executor: both move at once, no reload
    (repo / "mlp" / "model.yaml").write_text(yaml + "execution: executor\n")
    assert srv.wait_for(lambda: srv.core.manager.view().model("mlp").version(1).execution == "executor", 30)
    assert versions_execution(srv) == ({"1": "executor", "2": "executor"}, {"1": "executor", "2": "executor"})


def test_a_version_measured_over_the_limit_moves_its_twin_too(make_repo, serve):
    yaml = MLP_YAML.replace("version_policy: {latest: 1}", "version_policy: {specific: [1]}")
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}}, yaml={"mlp": yaml})
    srv = serve(repo, inline_forward_us=1e9)
    assert srv.wait_for(lambda: srv.available("mlp") == [1], 60)
    assert versions_execution(srv)[0] == {"1": "inline"}
    h1 = srv.core.manager.models["mlp"].serving[1]

    def only_v1_fast():  # v1 stays under the new limit; v2's real warm forward will not
        h1.runner.forward_s = 1e-9
        srv.core.manager.settings.inline_forward_us = 1.0
    srv.on_loop(only_v1_fast)
    (repo / "mlp" / "model.yaml").write_text(MLP_YAML.replace("version_policy: {latest: 1}", "version_policy: {specific: [1, 2]}"))
    assert srv.wait_for(lambda: srv.available("mlp") == [1, 2], 60)
    assert h1.runner.execution == "executor"
    assert versions_execution(srv)[0] == {"1": "executor", "2": "executor"}
