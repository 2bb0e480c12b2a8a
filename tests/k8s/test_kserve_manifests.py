"""deploy/kserve/ against KServe's API: the ClusterServingRuntime and InferenceServices
validate strictly against KServe's own CRD schemas (vendored in tests/k8s/schemas, source
named there); beside that, structurally: the fields and required fields of KServe's Go types (serving.kserve.io v1alpha1
ServingRuntimeSpec / SupportedModelFormat, v1beta1 ModelSpec / PredictorExtensionSpec),
KServe's runtime selection rule (model format label, autoSelect, protocol), the containers
against the Kubernetes schemas (kubernetes-validate), and the flags against splitserve's
own parser; probe paths exist in the app."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from runtime import __version__

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"
KUBERNETES_VERSIONS = ["1.30.0", "1.35.0"]

# serving.kserve.io/v1alpha1 ServingRuntimeSpec (ServingRuntimePodSpec inlined)
RUNTIME_SPEC = {"supportedModelFormats", "multiModel", "disabled", "protocolVersions", "workerSpec",
                "containers", "volumes", "nodeSelector", "affinity", "tolerations", "labels",
                "annotations", "imagePullSecrets", "hostIPC", "grpcEndpoint", "grpcDataEndpoint",
                "httpDataEndpoint", "replicas", "storageHelper", "builtInAdapter"}
MODEL_FORMAT = {"name", "version", "autoSelect", "priority"}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
# serving.kserve.io/v1beta1 ModelSpec: modelFormat, runtime, PredictorExtensionSpec
# (storageUri, runtimeVersion, protocolVersion, ...) and a corev1.Container inlined
MODEL_SPEC_OWN = {"modelFormat", "runtime", "storageUri", "storageUris", "runtimeVersion",
                  "protocolVersion", "storage"}
PREDICTOR = {"model", "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "canaryTrafficPercent",
             "containerConcurrency", "timeout", "logger", "batcher", "labels", "annotations",
             "serviceAccountName", "nodeSelector", "tolerations", "affinity", "volumes", "containers"}


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KSERVE / name).read_text()) if d]


RUNTIME = load("cluster-serving-runtime.yaml")[0]
SERVICES = load("inference-service.yaml")


def _validate_containers(containers: list[dict], where: str) -> None:
    import kubernetes_validate
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
           "spec": {"containers": containers}}
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: container invalid for Kubernetes {version}: {e.message}")


def _serve_args(args: list[str]):
    from runtime.cli.main import _parser
    return _parser().parse_args(["serve", *args])


def test_cluster_serving_runtime_has_kserves_shape():
    rt = RUNTIME
    assert (rt["apiVersion"], rt["kind"]) == ("serving.kserve.io/v1alpha1", "ClusterServingRuntime")
    assert rt["metadata"]["name"] and "namespace" not in rt["metadata"]  # cluster-scoped
    spec = rt["spec"]
    assert set(spec) <= RUNTIME_SPEC, f"not ServingRuntimeSpec fields: {set(spec) - RUNTIME_SPEC}"
    assert spec["containers"], "containers is required"
    for f in spec["supportedModelFormats"]:
        assert set(f) <= MODEL_FORMAT and isinstance(f["name"], str) and f["name"]
        assert isinstance(f.get("version", ""), str) and isinstance(f.get("autoSelect", False), bool)
        assert "priority" not in f or (isinstance(f["priority"], int) and f["priority"] >= 1)
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"} <= PROTOCOLS
    assert all(isinstance(v, str) for v in spec["annotations"].values())
    _validate_containers(spec["containers"], "ClusterServingRuntime")


def test_the_runtime_container_serves_kserves_layout_and_ports():
    (c,) = RUNTIME["spec"]["containers"]
    assert c["name"] == "kserve-container"  # KServe merges the predictor into this one
    assert c["image"] == f"splitserve:{__version__}"
    args = _serve_args(c["args"])
    assert (args.repository, args.host, args.http_port, args.grpc_port) == ("/mnt/models", "0.0.0.0", 8080, 9000)
    ann = RUNTIME["spec"]["annotations"]
    assert ann["prometheus.kserve.io/port"] == "8080" and ann["prometheus.kserve.io/path"] == "/metrics"
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 10001 and not sc["allowPrivilegeEscalation"]
    assert [e["name"] for e in c["env"]] == ["SPLITSERVE_TOKEN"] and c["env"][0]["valueFrom"]["secretKeyRef"]["optional"]


def test_probe_and_metrics_paths_exist_in_the_app():
    from test_k8s_manifests import _app_status
    # (path, what it answers before any model loads): ready only once loaded
    assert _app_status("/v2/health/ready") == 503 and _app_status("/v2/health/live") == 200
    assert _app_status("/metrics") == 200


def _selects(service: dict, runtime: dict) -> bool:
    """KServe's rule (v1beta1 ModelSpec.RuntimeSupportsModel, IsProtocolVersionSupported)."""
    model = service["spec"]["predictor"]["model"]
    fmt = model["modelFormat"]
    want = f"mt:{fmt['name']}" + (f":{fmt['version']}" if "version" in fmt else "")
    have = set()
    for f in runtime["spec"]["supportedModelFormats"]:
        if "runtime" in model or f.get("autoSelect"):
            have |= {f"mt:{f['name']}"} | ({f"mt:{f['name']}:{f['version']}"} if "version" in f else set())
    protocol = model.get("protocolVersion", "v1")
    return want in have and protocol in runtime["spec"].get("protocolVersions", [protocol])


@pytest.mark.parametrize("isvc", SERVICES, ids=[s["metadata"]["name"] for s in SERVICES])
def test_the_inference_services_have_kserves_shape_and_select_the_runtime(isvc):
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert set(predictor) <= PREDICTOR
    model = predictor["model"]
    assert model["modelFormat"]["name"] and set(model["modelFormat"]) <= {"name", "version"}
    assert model["runtime"] == RUNTIME["metadata"]["name"]
    assert model["protocolVersion"] in PROTOCOLS and model["storageUri"]
    assert _selects(isvc, RUNTIME)
    # KServe merges the model's container fields into the runtime's kserve-container
    own = {k: v for k, v in model.items() if k not in MODEL_SPEC_OWN}
    merged = copy.deepcopy(RUNTIME["spec"]["containers"][0])
    merged["args"] = merged["args"] + own.pop("args", [])
    merged.update(own)
    _validate_containers([merged], isvc["metadata"]["name"])
    args = _serve_args(merged["args"])
    assert args.repository == "/mnt/models" and args.config.startswith("/mnt/models/")
    if model["protocolVersion"] == "grpc-v2":
        (port,) = model["ports"]
        assert port == {"name": "h2c", "containerPort": args.grpc_port, "protocol": "TCP"}


def test_kserve_would_not_auto_select_this_runtime_for_plain_pytorch():
    """A predictor with modelFormat pytorch and no runtime keeps KServe's own choice."""
    isvc = {"spec": {"predictor": {"model": {"modelFormat": {"name": "pytorch"}, "protocolVersion": "v2"}}}}
    assert not _selects(isvc, RUNTIME)
    isvc["spec"]["predictor"]["model"]["runtime"] = "kserve-splitserve"
    assert _selects(isvc, RUNTIME)


def test_the_structural_check_catches_a_wrong_field():
    bad = copy.deepcopy(RUNTIME)
    bad["spec"]["protocolVersion"] = ["v2"]  # singular: not a ServingRuntimeSpec field
    assert not set(bad["spec"]) <= RUNTIME_SPEC
    import kubernetes_validate
    c = copy.deepcopy(RUNTIME["spec"]["containers"][0])
    c["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                                      "spec": {"containers": [c]}}, KUBERNETES_VERSIONS[0], strict=True)


def test_the_manifests_validate_against_kserves_crd_schemas():
    import crd_schemas

    assert crd_schemas.errors("ClusterServingRuntime", RUNTIME) == []
    for isvc in SERVICES:
        assert crd_schemas.errors("InferenceService", isvc) == [], isvc["metadata"]["name"]
    bad = copy.deepcopy(RUNTIME)
    bad["spec"]["supportedModelFormats"][0]["autoselect"] = bad["spec"]["supportedModelFormats"][0].pop("autoSelect")
    assert any("autoselect" in e for e in crd_schemas.errors("ClusterServingRuntime", bad))
    bad = copy.deepcopy(SERVICES[0])
    bad["spec"]["predictor"]["model"]["storageURI"] = bad["spec"]["predictor"]["model"].pop("storageUri")
    assert any("storageURI" in e for e in crd_schemas.errors("InferenceService", bad))
