"""The image and the manifests: every kustomize overlay renders (`kubectl kustomize`,
offline), validates against the Kubernetes schemas of KUBERNETES_VERSIONS, and obeys the
policies the runtime depends on (probe paths and ports exist in the app, selectors match
the pod labels, the grace period covers delay + drain, non-root and read-only)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit  # starts no server process, binds no socket

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["base", "overlays/pvc", "overlays/gpu", "overlays/shared-routing"]
KUBERNETES_VERSIONS = ["1.30.0", "1.35.0"]  # oldest supported and a current one (README)
KUBECTL = shutil.which("kubectl")


def render(overlay: str) -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot render kustomize overlays")
    out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_every_overlay_validates(docs):
    import kubernetes_validate

    name, items = docs
    kinds = {d["kind"] for d in items}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ServiceAccount", "Role", "RoleBinding"} <= kinds, kinds
    for version in KUBERNETES_VERSIONS:
        for d in items:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {d['kind']}/{d['metadata']['name']} invalid for {version}: {e.message}")


def test_the_validator_catches_a_misspelt_field():
    import copy

    import kubernetes_validate

    dep = copy.deepcopy(one(render("base"), "Deployment"))
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBERNETES_VERSIONS[0], strict=True)


def _app_status(path: str) -> int:
    """What the real app answers on `path` (before any model loads): 404 means no such route."""
    import asyncio

    import httpx

    from runtime.service.core import Core
    from runtime.server.app import build_app
    from runtime.config.settings import Settings

    async def get() -> int:
        transport = httpx.ASGITransport(app=build_app(Core(Settings())))
        async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
            return (await client.get(path)).status_code
    return asyncio.run(get())


def _container(items):
    pod = one(items, "Deployment")["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    return pod, c


def _arg(c: dict, flag: str) -> str:
    args = c["args"]
    return args[args.index(flag) + 1]


def _server_settings(items):
    from runtime.config.settings import ServerSettings

    cm = one(items, "ConfigMap")
    doc = yaml.safe_load(cm["data"]["splitserve.yaml"])
    return ServerSettings.model_validate(doc.get("server", {})), cm


def test_probes_hit_app_paths_on_declared_ports(docs):
    _, items = docs
    pod, c = _container(items)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(_arg(c, "--http-port")) and ports["grpc"] == int(_arg(c, "--grpc-port"))
    assert _arg(c, "--host") == "0.0.0.0"  # the pod IP must be reachable; loopback is the default
    # (path, what it answers while loading): live at once, ready only once loaded
    want = {"startupProbe": ("/v2/health/ready", 503), "readinessProbe": ("/v2/health/ready", 503),
            "livenessProbe": ("/v2/health/live", 200)}
    for probe, (path, status) in want.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and _app_status(path) == status, (probe, get)
        assert get["port"] in ports or get["port"] in ports.values(), (probe, get)
    # readiness tolerates one slow answer (a flood on the shared loop), and still drops
    # the pod from its Service before the shutdown delay is over
    rp = c["readinessProbe"]
    srv, _ = _server_settings(items)
    assert rp["failureThreshold"] >= 2
    assert rp["periodSeconds"] * rp["failureThreshold"] <= srv.shutdown_delay_s
    # the startup probe waits at least as long as the start deadline
    sp = c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= srv.start_timeout_s


def test_selectors_match_pod_labels(docs):
    _, items = docs
    dep = one(items, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]

    def matches(sel: dict) -> bool:
        return sel and all(labels.get(k) == v for k, v in sel.items())

    assert matches(dep["spec"]["selector"]["matchLabels"])
    assert matches(one(items, "Service")["spec"]["selector"])
    assert matches(one(items, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    ref = one(items, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])


def test_grace_period_covers_delay_and_drain_and_the_config_is_wired(docs):
    _, items = docs
    pod, c = _container(items)
    srv, cm = _server_settings(items)
    assert srv.shutdown_delay_s == 5
    assert pod["spec"]["terminationGracePeriodSeconds"] >= srv.shutdown_delay_s + srv.drain_timeout_s + 5
    cfg = _arg(c, "--config")
    if cfg.startswith("kubernetes://"):  # shared routing: the replicas read the ConfigMap itself
        assert cfg == f"kubernetes://$(POD_NAMESPACE)/{cm['metadata']['name']}" and "splitserve.yaml" in cm["data"]
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        # the experiment decider is reached at http://$POD_IP:<http port> (runtime/decider/fleet.py)
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert _arg(c, "--http-port") == "8000"
        return
    mounted = {v["name"]: v for v in pod["spec"]["volumes"]}
    mount = next(m for m in c["volumeMounts"] if cfg.startswith(m["mountPath"] + "/"))
    assert mounted[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert cfg.rsplit("/", 1)[1] in cm["data"]


def test_configmap_routing_is_valid_for_the_bundled_models(docs):
    from router import parse_config_text, validate_against
    from runtime.repository.scan import scan_model

    _, items = docs
    _, cm = _server_settings(items)
    for model, rc in parse_config_text(cm["data"]["splitserve.yaml"], "configmap").items():
        validate_against(rc, scan_model(ROOT / "model_repository" / model).versions, model=model)


def test_security_context(docs):
    _, items = docs
    pod, c = _container(items)
    ps = pod["spec"]["securityContext"]
    assert ps["runAsNonRoot"] is True and ps["runAsUser"] > 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # the only writable path
    assert ps["runAsUser"] == int(re.search(r"^USER (\d+)", DOCKERFILE, re.M).group(1))


def test_service_hpa_and_rbac(docs):
    _, items = docs
    ports = {p["name"]: p for p in one(items, "Service")["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc" and ports["http"]["targetPort"] == "http"
    metrics = one(items, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metrics[0]["type"] == "Pods" and metrics[0]["pods"]["metric"]["name"] == "splitserve_inflight_requests"
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
    from runtime.metrics import prometheus  # noqa: F401  (the metric is one the runtime exports)
    assert "splitserve_inflight_requests" in (ROOT / "runtime" / "metrics" / "prometheus.py").read_text()
    rule, lease, create = one(items, "Role")["rules"]
    cm = one(items, "ConfigMap")["metadata"]["name"]
    assert rule["resources"] == ["configmaps"] and rule["resourceNames"] == [cm]
    assert "delete" not in rule["verbs"] and "create" not in rule["verbs"]
    # the experiment decider's Lease (runtime/decider/lease_k8s.py): the one, by name; create unnamed
    assert lease["apiGroups"] == create["apiGroups"] == ["coordination.k8s.io"]
    assert lease["resources"] == create["resources"] == ["leases"]
    assert lease["resourceNames"] == [f"{cm}-decider"] and sorted(lease["verbs"]) == ["get", "update"]
    assert create["verbs"] == ["create"] and "resourceNames" not in create
    pod, _ = _container(items)
    assert pod["spec"]["serviceAccountName"] == one(items, "ServiceAccount")["metadata"]["name"]


def test_overlays_add_what_they_say():
    pvc = render("overlays/pvc")
    pod, c = _container(pvc)
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = vols["models"]["persistentVolumeClaim"]["claimName"]
    assert claim == one(pvc, "PersistentVolumeClaim")["metadata"]["name"]
    assert any(m["name"] == "models" and m["mountPath"] == _arg(c, "--repository") for m in c["volumeMounts"])
    gpu = render("overlays/gpu")
    _, c = _container(gpu)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert one(gpu, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-cuda")


DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_policy():
    final = DOCKERFILE.rsplit("\nFROM ", 1)[1]  # the runtime stage
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim", DOCKERFILE, re.M)
    assert re.search(r"^USER \d+:\d+$", final, re.M), "numeric non-root user"
    entry = re.search(r"^ENTRYPOINT (.+)$", final, re.M).group(1)
    assert json.loads(entry) == ["splitserve", "serve"], "exec-form entrypoint"
    cmd = json.loads(re.search(r"^CMD (.+)$", final, re.M).group(1))
    assert "--host" in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    hc = re.search(r"^HEALTHCHECK .*\n\s+CMD (.+)$", final, re.M).group(1)
    hc_cmd = json.loads(hc)
    assert hc_cmd[:2] == ["python", "-c"] and "urllib.request" in hc_cmd[2] and "/v2/health/live" in hc_cmd[2]
    compile(hc_cmd[2], "healthcheck", "exec")
    assert re.search(r"^ARG TORCH_SPEC=", DOCKERFILE, re.M) and "TORCH_INDEX_URL" in DOCKERFILE


def test_dockerignore_keeps_the_context_small():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**"  # everything out, then only what the image needs back in
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"runtime", "router", "pyproject.toml"} <= allowed
    assert not allowed & {"tests", ".venv", "bench", ".git"}
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE, re.M):
        for part in src.split():
            assert part.rstrip("/") in allowed, f"COPY {part} is excluded by .dockerignore"
