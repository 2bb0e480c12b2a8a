"""Validation against CustomResourceDefinition schemas vendored in tests/k8s/schemas (each
file names its source repository, path and commit in `$comment`): strict, as
`kubectl apply --validate=strict` is, so a field the CRD does not list is an error (the
API server would prune it silently), unless the schema keeps unknown fields there."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMAS = Path(__file__).resolve().parent / "schemas"
FILES = {
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.v1.json",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.v1.json",
    "ClusterServingRuntime": "serving.kserve.io_clusterservingruntimes.v1alpha1.json",
    "InferenceService": "serving.kserve.io_inferenceservices.v1beta1.json",
    "ScaledObject": "keda.sh_scaledobjects.v1alpha1.json",
}


def _strict(node):
    if isinstance(node, dict):
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") \
                and "additionalProperties" not in node:
            node["additionalProperties"] = False
        if node.get("x-kubernetes-int-or-string"):  # OpenAPI's int-or-string has no JSON Schema type
            node.pop("type", None)
            node["type"] = ["integer", "string"]
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


def validator(kind: str):
    import jsonschema

    schema = json.loads((SCHEMAS / FILES[kind]).read_text())
    schema.pop("$comment")
    # apiVersion/kind/metadata are the API server's own; CRDs type them loosely
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    # no check_schema: the CRDs' patterns are Go regular expressions, not Python's
    return jsonschema.Draft7Validator(_strict(schema))


def errors(kind: str, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}"
            for e in validator(kind).iter_errors(doc)]
