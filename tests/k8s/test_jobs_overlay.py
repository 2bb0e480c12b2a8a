"""deploy/kubernetes/overlays/jobs: renders (kustomize), every Kubernetes object validates
against the Kubernetes schemas (strict), and the KEDA ScaledObject is checked for the
structure KEDA's CRD requires and for what the runtime writes: one redis-streams trigger
per routed model on the stream and group runtime/jobs/redis_streams.py uses, from zero
replicas, aimed at the `--jobs-only` worker Deployment. The KEDA CRD schema itself is not
vendored here (no offline copy): the structural schema below is written from KEDA's
ScaledObject spec (scaleTargetRef.name and triggers[].type/metadata required, metadata
values strings)."""

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
