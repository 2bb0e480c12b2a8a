"""deploy/kubernetes/monitoring: the ServiceMonitor and PrometheusRule render (kustomize),
validate against the prometheus-operator CRD schemas (vendored under tests/k8s/schemas,
source named in each file), name only metrics splitserve exports, and the alerts fire on
the series they are meant for: `promtool test rules` (Prometheus's own rule engine) on
synthetic series."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import crd_schemas

pytestmark = pytest.mark.unit  # starts no server process, binds no socket

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "kubernetes" / "monitoring"
KUBECTL, PROMTOOL = shutil.which("kubectl"), shutil.which("promtool")
METRIC_RE = re.compile(r"\b(splitserve_[a-z_]+)")


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot render kustomize")
    out = subprocess.run([KUBECTL, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}


def test_both_validate_against_the_operator_schemas(docs):
    assert set(docs) == {"ServiceMonitor", "PrometheusRule"}
    for kind, d in docs.items():
        errors = crd_schemas.errors(kind, d)
        assert not errors, f"{kind}: {errors}"


def test_the_schema_catches_a_misspelt_field(docs):
    bad = json.loads(json.dumps(docs["ServiceMonitor"]))
    bad["spec"]["endpoints"][0]["intervall"] = bad["spec"]["endpoints"][0].pop("interval")
    errors = list(crd_schemas.validator("ServiceMonitor").iter_errors(bad))
    assert any("intervall" in e.message for e in errors), [e.message for e in errors]
    rule = json.loads(json.dumps(docs["PrometheusRule"]))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]  # required
    assert list(crd_schemas.validator("PrometheusRule").iter_errors(rule))


def test_the_monitor_scrapes_the_services_metrics_port(docs):
    svc = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "base" / "service.yaml").read_text())
    ports = {p["name"] for p in svc["spec"]["ports"]}
    ep = docs["ServiceMonitor"]["spec"]["endpoints"][0]
    assert ep["port"] in ports and ep["path"] == "/metrics"
    assert docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= \
        svc["spec"]["selector"].items() | {("app.kubernetes.io/name", "splitserve")}


def test_every_rule_names_an_exported_family(docs):
    source = "".join(p.read_text() for p in (ROOT / "runtime").rglob("*.py"))
    families = set(re.findall(r'"(splitserve_[a-z_]+)"', source))
    for group in docs["PrometheusRule"]["spec"]["groups"]:
        for rule in group["rules"]:
            for name in METRIC_RE.findall(rule["expr"]):
                if name.startswith("splitserve_") and ":" not in name:
                    base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                    assert base in families, f"{rule.get('alert') or rule.get('record')}: {name} is not exported"


TESTS = """
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # version 2 fails 10% of 10 req/s; version 1 is healthy
      - series: 'splitserve_requests_total{model="mlp",version="1",code="OK"}'
        values: '0+600x40'
      - series: 'splitserve_requests_total{model="mlp",version="2",code="OK"}'
        values: '0+540x40'
      - series: 'splitserve_requests_total{model="mlp",version="2",code="INTERNAL"}'
        values: '0+60x40'
      - series: 'splitserve_requests_total{model="mlp",version="2",code="INVALID_ARGUMENT"}'
        values: '0+600x40'
      - series: 'splitserve_experiment_rollbacks_total{model="mlp",reason="errors"}'
        values: '0 0 0 1 1 1 1 1 1 1 1'
      - series: 'splitserve_experiment_srm_p_value{model="mlp",pod="a"}'
        values: '0.5 0.5 0.0001x20'
      - series: 'splitserve_store_up{pod="a"}'
        values: '1 1 0x20'
    alert_rule_test:
      - eval_time: 20m
        alertname: SplitserveVersionErrorRatioHigh
        exp_alerts:
          - exp_labels: {severity: warning, model: mlp, version: "2"}
            exp_annotations:
              summary: "mlp version 2 fails 10% of its requests"
      - eval_time: 5m
        alertname: SplitserveExperimentRolledBack
        exp_alerts:
          - exp_labels: {severity: warning, model: mlp, reason: errors}
            exp_annotations: {summary: "mlp: experiment rolled back (errors)"}
      - eval_time: 30m
        alertname: SplitserveExperimentRolledBack
        exp_alerts: []
      - eval_time: 15m
        alertname: SplitserveSampleRatioMismatch
        exp_alerts:
          - exp_labels: {severity: warning, model: mlp}
            exp_annotations: {summary: "mlp: traffic split differs from the configured one (p = 0.0001)"}
      - eval_time: 15m
        alertname: SplitserveStoreMirrorFailing
        exp_alerts:
          - exp_labels: {severity: warning, pod: a}
            exp_annotations: {summary: "splitserve cannot sync its object-storage repository; it serves what it has"}
"""


def test_alerts_fire_on_the_series_they_are_for(docs, tmp_path):
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": docs["PrometheusRule"]["spec"]["groups"]}))
    check = subprocess.run([PROMTOOL, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "tests.yaml").write_text(TESTS)
    run = subprocess.run([PROMTOOL, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
