"""deploy/: every manifest validates (Kubernetes schemas strictly, InferenceServices against kserve's typed models),
the checker does catch mistakes, and the manifests say what docs/deploy.md promises. No cluster, no server."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from conftest import ROOT

from camserve_tools.kserve.bundle import read_properties
from camserve_tools.manifests import check_document, check_tree

DEPLOY = ROOT / "deploy"


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def by_kind(kind: str) -> list[dict]:
    return [document for path in sorted(DEPLOY.rglob("*.yaml")) for document in documents(path) if document.get("kind") == kind]


def one(kind: str) -> dict:
    (found,) = by_kind(kind)
    return found


def test_every_manifest_validates() -> None:
    assert check_tree(DEPLOY) == {}


def test_the_checker_catches_unknown_fields_and_wrong_kinds() -> None:
    service = next(s for s in by_kind("InferenceService") if "env" in s["spec"]["predictor"]["model"])
    typo = copy.deepcopy(service)
    typo["spec"]["predictor"]["model"]["runtimeVerison"] = "0.12.0"
    assert any("runtimeVerison: unknown field" in problem for problem in check_document(typo))
    deep = copy.deepcopy(service)
    deep["spec"]["predictor"]["model"]["env"][0]["valueFrom2"] = {}
    assert any("env[0].valueFrom2: unknown field" in problem for problem in check_document(deep))
    wrong = copy.deepcopy(service)
    wrong["spec"]["predictor"]["minReplicas"] = "one"
    assert any("minReplicas: int" in problem for problem in check_document(wrong))
    deployment = copy.deepcopy(one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert check_document(deployment), "strict validation refuses an unknown container field"


def test_inference_services() -> None:
    services = [s for s in by_kind("InferenceService") if s["spec"]["predictor"]["model"]["runtime"] != "camserve"]
    protocols = set()
    for service in services:
        predictor = service["spec"]["predictor"]
        model = predictor["model"]
        assert model["modelFormat"]["name"] == "pytorch" and model["runtime"] == "kserve-torchserve"
        assert model["runtimeVersion"] == "0.12.0", "the runtime's default image is TorchServe 0.9.0"
        assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
        assert model["resources"]["requests"]["cpu"] and model["resources"]["limits"]["memory"]
        assert model["readinessProbe"]["httpGet"]["port"] == 8080
        assert {"name": "TS_DISABLE_TOKEN_AUTHORIZATION", "value": "true"} in model["env"]
        protocols.add(model["protocolVersion"])
    assert protocols == {"v1", "v2"}
    knative = [s for s in services if "serving.kserve.io/deploymentMode" not in s["metadata"].get("annotations", {})]
    assert all(s["spec"]["predictor"]["scaleMetric"] == "concurrency" for s in knative) and len(knative) == 2
    (standard,) = [s for s in services if s["metadata"]["annotations"].get("serving.kserve.io/deploymentMode") == "Standard"]
    metrics = standard["spec"]["predictor"]["autoScaling"]["metrics"]
    prometheus = [m["external"]["metric"] for m in metrics if m["type"] == "External"]
    assert prometheus and prometheus[0]["backend"] == "prometheus" and "ts_queue_latency_microseconds" in prometheus[0]["query"]


def test_kubernetes_deployment() -> None:
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "pytorch/torchserve:0.12.0-cpu"
    assert container["livenessProbe"]["httpGet"]["path"] == "/ping"
    assert container["readinessProbe"]["exec"]["command"][:2] == ["python", "/etc/camserve/readiness_probe.py"]
    assert {mount["mountPath"] for mount in container["volumeMounts"]} == {"/etc/camserve", "/mnt/models"}
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2" and {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    assert one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_metrics_port_is_on_no_service() -> None:
    """Metrics carry the hostname and error counts: Prometheus scrapes the pods, no Service exposes 8082."""
    for service in by_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert all(port["port"] != 8082 and port.get("targetPort") not in (8082, "metrics") for port in service["spec"]["ports"])
    policy = one("NetworkPolicy")
    metrics_rules = [rule for rule in policy["spec"]["ingress"] if any(port["port"] == 8082 for port in rule["ports"])]
    assert metrics_rules and all(source.get("namespaceSelector") for rule in metrics_rules for source in rule["from"])


def test_kubernetes_config_carries_production_settings() -> None:
    """configmap.yaml's config.properties is production.properties plus pod addresses; tokens off is the one exception."""
    config_map = next(c for c in by_kind("ConfigMap") if "config.properties" in c["data"])
    ours = dict(
        line.split("=", 1) for line in config_map["data"]["config.properties"].splitlines() if "=" in line and not line.startswith("#")
    )
    documented_exceptions = {"disable_token_authorization", "allowed_urls"}
    for key, value in read_properties(ROOT / "config" / "production.properties"):
        if key not in documented_exceptions:
            assert ours.get(key) == value, key
    assert ours["disable_token_authorization"] == "true" and ours["management_address"].startswith("http://127.0.0.1:")


def test_the_native_runtime_and_its_inference_service() -> None:
    """camserve's own ClusterServingRuntime (KServe's model server hosting the pipeline) and a service that names it."""
    runtime = one("ClusterServingRuntime")
    (container,) = runtime["spec"]["containers"]
    assert container["command"] == ["python", "-m", "camserve.engines.kserve_model"]
    assert container["args"][:2] == ["--model-store", "/mnt/models"] and "--grpc-listen-port" in container["args"]
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert {"v1", "v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (service,) = [s for s in by_kind("InferenceService") if s["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]]
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] in formats and model["storageUri"]
    assert model["readinessProbe"]["httpGet"]["path"] == "/v2/models/shapes/ready"
