"""deploy/kubernetes/overlays/jobs: renders (kustomize), every Kubernetes object validates
against the Kubernetes schemas (strict), and the KEDA ScaledObject is checked for the
structure KEDA's CRD requires and for what the runtime writes: one redis-streams trigger
per routed model on the stream and group runtime/jobs/redis_streams.py uses, from zero
replicas, aimed at the `--jobs-only` worker Deployment. It validates strictly against
KEDA's own ScaledObject CRD schema (vendored in tests/k8s/schemas, source named there),
and against the tighter structural schema below (metadata values strings, the
redis-streams keys KEDA reads)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from runtime.jobs.redis_streams import GROUP, PREFIX

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "jobs"
KUBECTL = shutil.which("kubectl")
KUBERNETES_VERSIONS = ["1.30.0", "1.35.0"]

SCALED_OBJECT = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False,
                                   "required": ["name"],
                                   "properties": {"name": {"type": "string"},
                                                  "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer"},
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["type", "metadata"],
                    "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                   "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                   "useCachedMetrics": {"type": "boolean"},
                                   "authenticationRef": {"type": "object", "required": ["name"]},
                                   "metadata": {"type": "object",
                                                "additionalProperties": {"type": "string"}}}}},
            }},
    }}
REDIS_STREAMS_KEYS = {"address", "host", "port", "addresses", "hosts", "ports", "password",
                      "databaseIndex", "stream", "consumerGroup", "pendingEntriesCount",
                      "streamLength", "lagCount", "activationLagCount", "enableTLS",
                      "unsafeSsl", "usernameFromEnv", "passwordFromEnv"}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot render kustomize overlays")
    out = subprocess.run([KUBECTL, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kubernetes_objects_validate(docs):
    import kubernetes_validate
    for version in KUBERNETES_VERSIONS:
        for d in docs:
            if d["kind"] == "ScaledObject":
                continue
            kubernetes_validate.validate(d, version, strict=True)


def test_scaled_object_structure_and_what_it_watches(docs):
    import jsonschema
    from router import yamltext
    from runtime.config.settings import Settings, settings_part

    so = [d for d in docs if d["kind"] == "ScaledObject"]
    assert len(so) == 1
    so = so[0]
    jsonschema.validate(so, SCALED_OBJECT)
    spec = so["spec"]
    assert spec["minReplicaCount"] == 0  # scale from zero
    workers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    target = workers[spec["scaleTargetRef"]["name"]]
    args = target["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--jobs-only" in args and "--grpc-port" not in args
    # the document both Deployments read: valid settings with a Redis jobs.url
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    doc = yamltext.load(cm["data"]["splitserve.yaml"])
    s = Settings.model_validate(settings_part(doc))
    assert s.jobs.url.startswith("redis://")
    host = s.jobs.url.removeprefix("redis://").split("/")[0]
    streams = set()
    for t in spec["triggers"]:
        assert t["type"] == "redis-streams"
        md = t["metadata"]
        assert set(md) <= REDIS_STREAMS_KEYS, set(md) - REDIS_STREAMS_KEYS
        assert md["consumerGroup"] == GROUP and md["address"] == host
        assert md["databaseIndex"] == s.jobs.url.rsplit("/", 1)[1]
        assert int(md["lagCount"]) >= 1
        streams.add(md["stream"])
    assert streams == {f"{PREFIX}stream:{m}" for m in doc["models"]}  # one per routed model


def test_the_structural_schema_catches_a_misspelt_field():
    import jsonschema
    bad = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": {"name": "w"}, "minReplicas": 0,
                    "triggers": [{"type": "redis-streams", "metadata": {"lagCount": 10}}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT)


RULES = OVERLAY / "prometheusrule-jobs.yaml"
RULE_TESTS = """
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'splitserve_jobs_oldest_queued_age_seconds{model="mlp",pod="a"}'
        values: '0+60x40'
      - series: 'splitserve_job_attempts_total{model="mlp",outcome="failed",pod="a"}'
        values: '0 0 0 0 0 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10'
      - series: 'splitserve_job_callbacks_total{result="failed",pod="a"}'
        values: '0x10 1x10'
    alert_rule_test:
      - eval_time: 10m
        alertname: SplitserveJobsBacklogOld
        exp_alerts: []
      - eval_time: 30m
        alertname: SplitserveJobsBacklogOld
        exp_alerts:
          - exp_labels: {severity: warning, model: mlp}
            exp_annotations:
              summary: "mlp: a job has waited over 15 minutes in the queue; workers cannot keep up or none runs"
      - eval_time: 8m
        alertname: SplitserveJobsFailing
        exp_alerts:
          - exp_labels: {severity: warning, model: mlp}
            exp_annotations: {summary: "mlp: 10 jobs failed for good in 15 minutes"}
      - eval_time: 12m
        alertname: SplitserveJobCallbacksFailing
        exp_alerts:
          - exp_labels: {severity: warning}
            exp_annotations:
              summary: "job callbacks gave up after every retry; receivers are down or refuse the signature"
"""


def test_jobs_alerts_validate_name_exported_families_and_fire(tmp_path):
    """Against the prometheus-operator schema vendored for deploy/kubernetes/monitoring,
    naming only families runtime/ exports, and `promtool test rules` on synthetic series."""
    import json
    import re

    import jsonschema
    doc = yaml.safe_load(RULES.read_text())
    schema = json.loads((ROOT / "tests" / "k8s" / "schemas" /
                         "monitoring.coreos.com_prometheusrules.v1.json").read_text())
    schema.pop("$comment", None)
    schema["properties"]["metadata"] = {"type": "object"}
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert not errors, errors
    source = "".join(p.read_text() for p in (ROOT / "runtime").rglob("*.py"))
    families = set(re.findall(r'"(splitserve_[a-z_]+)"', source))
    for rule in doc["spec"]["groups"][0]["rules"]:
        for name in re.findall(r"\b(splitserve_[a-z_]+)", rule["expr"]):
            assert re.sub(r"_total$", "", name) in families, name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    (tmp_path / "tests.yaml").write_text(RULE_TESTS)
    run = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_scaled_object_validates_against_kedas_crd_schema(docs):
    import copy

    import crd_schemas

    so = [d for d in docs if d["kind"] == "ScaledObject"]
    assert so and all(crd_schemas.errors("ScaledObject", d) == [] for d in so), \
        [crd_schemas.errors("ScaledObject", d) for d in so]
    bad = copy.deepcopy(so[0])
    bad["spec"]["minReplicas"] = bad["spec"].pop("minReplicaCount", 0)
    assert any("minReplicas" in e for e in crd_schemas.errors("ScaledObject", bad))
