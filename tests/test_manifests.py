"""deploy/: every manifest validates (Kubernetes schemas strictly; KServe's kinds against KServe's own CRDs strictly and
InferenceServices against kserve's typed models), the checker does catch mistakes, and the manifests say what
docs/deploy.md promises. No cluster, no server."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest
import yaml
from support import ROOT

from camserve_tools.deploy.manifests import KSERVE_CRDS, check_against_crd, check_document, check_tree
from camserve_tools.kserve.bundle import read_properties

DEPLOY = ROOT / "deploy"


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def by_kind(kind: str) -> list[dict]:
    return [document for path in sorted(DEPLOY.rglob("*.yaml")) for document in documents(path) if document.get("kind") == kind]


def one(kind: str) -> dict:
    (found,) = by_kind(kind)
    return found


def runtime_named(name: str) -> dict:
    (found,) = [runtime for runtime in by_kind("ClusterServingRuntime") if runtime["metadata"]["name"] == name]
    return found


@pytest.mark.slow
def test_every_manifest_validates() -> None:
    assert check_tree(DEPLOY) == {}


def kserve_documents() -> list[dict]:
    return [d for kind in ("InferenceService", "ServingRuntime", "ClusterServingRuntime") for d in by_kind(kind)]


@pytest.fixture
def crds() -> Path:
    if not KSERVE_CRDS.is_dir():
        pytest.skip(f"KServe's CRDs are not at {KSERVE_CRDS} (../shared/kserve-crds): the strict CRD schema check cannot run")
    return KSERVE_CRDS


def test_kserve_manifests_validate_against_kserve_crds(crds: Path) -> None:
    """Every InferenceService and (Cluster)ServingRuntime under deploy/ against KServe v0.20's openAPIV3Schema."""
    documents = kserve_documents()
    assert {d["kind"] for d in documents} >= {"InferenceService", "ClusterServingRuntime"}
    for document in documents:
        assert check_against_crd(document, crds) == [], document["metadata"]["name"]


def test_the_crd_check_refuses_unknown_fields_and_wrong_types(crds: Path) -> None:
    ours = next(s for s in by_kind("InferenceService") if s["spec"]["predictor"]["model"]["runtime"] == "camserve-torchserve")
    service = copy.deepcopy(ours)
    service["spec"]["predictor"]["model"]["runtimeVerison"] = "0.12.0"
    assert any("runtimeVerison" in problem for problem in check_against_crd(service, crds))
    nested = copy.deepcopy(ours)
    nested["spec"]["predictor"]["model"]["readinessProbe"]["exec"]["comand"] = ["true"]
    assert any("comand" in problem for problem in check_against_crd(nested, crds))
    runtime = copy.deepcopy(runtime_named("camserve-torchserve"))
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    assert any("containerPort" in problem for problem in check_against_crd(runtime, crds))
    runtime = copy.deepcopy(runtime_named("camserve-torchserve"))
    runtime["spec"]["supportedModelFormat"] = runtime["spec"].pop("supportedModelFormats")
    assert any("supportedModelFormat" in problem for problem in check_against_crd(runtime, crds))
    wrong_version = copy.deepcopy(runtime_named("camserve-torchserve"))
    wrong_version["apiVersion"] = "serving.kserve.io/v1beta1"
    assert check_against_crd(wrong_version, crds) == [f"no CRD in {crds} defines serving.kserve.io/v1beta1 ClusterServingRuntime"]


def test_without_the_crds_the_check_says_it_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import camserve_tools.deploy.manifests as manifests

    monkeypatch.setattr(manifests, "KSERVE_CRDS", tmp_path / "absent")
    monkeypatch.setattr(manifests, "KUBERAY_CRDS", tmp_path / "absent-too")
    skipped: list[str] = []
    assert check_tree(DEPLOY, skipped) == {}
    assert skipped == [
        f"{tmp_path / 'absent'} is absent: KServe manifests not checked against KServe's CRDs",
        f"{tmp_path / 'absent-too'} is absent: the RayService checked by KubeRay's field names, not against its CRD",
    ]


def test_one_image_variable_names_the_version() -> None:
    """Every container of deploy/ runs camserve's image, named `camserve:<pyproject version>`, which each folder's
    kustomization.yaml maps to the user's registry and tag."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = [c["image"] for c in one("Deployment")["spec"]["template"]["spec"]["containers"]]
    images += [c["image"] for c in runtime_named("camserve-torchserve")["spec"]["containers"]]
    assert images
    assert set(images) == {f"camserve:{version}"}
    for folder in ("kubernetes", "kserve"):
        (kustomization,) = documents(DEPLOY / folder / "kustomization.yaml")
        assert kustomization["images"] == [{"name": "camserve", "newName": "registry.example.com/camserve", "newTag": version}]
        listed = {DEPLOY / folder / name for name in kustomization["resources"]}
        assert all(path.is_file() for path in listed), folder


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
    rule = copy.deepcopy(one("PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["fore"] = "5m"
    assert any("fore" in problem for problem in check_document(rule))
    kustomization = next(d for d in documents(DEPLOY / "kubernetes" / "kustomization.yaml"))
    assert check_document({**kustomization, "image": []}) == ["unknown kustomization key 'image'"]


def test_inference_services() -> None:
    services = [s for s in by_kind("InferenceService") if s["spec"]["predictor"]["model"]["runtime"] == "camserve-torchserve"]
    runtime = runtime_named("camserve-torchserve")
    protocols = set()
    for service in services:
        predictor = service["spec"]["predictor"]
        model = predictor["model"]
        assert model["modelFormat"]["name"] == "camserve"
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        assert "storageUri" not in model, "the archives are in the image"
        assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
        assert model["resources"]["requests"]["cpu"]
        assert model["resources"]["limits"]["memory"]
        env = {e["name"]: e["value"] for e in model["env"]}
        config = {"v1": "kserve.properties", "v2": "kserve-v2.properties"}[model["protocolVersion"]]
        assert env["CAMSERVE_CONFIG"] == f"/opt/camserve/config/{config}"
        assert env["CAMSERVE_PROBE_PROTOCOL"] == model["protocolVersion"]
        assert model["readinessProbe"]["exec"]["command"][:3] == ["python", "-m", "camserve_tools.container.probe"]
        # Liveness proves a real answer straight from TorchServe, in the runtime's envelope: TorchServe 0.12 can lose a
        # model for good while it still reports it ready.
        liveness = model["livenessProbe"]["exec"]["command"]
        envelope = {"v1": "kserve", "v2": "kservev2"}[model["protocolVersion"]]
        assert liveness[:3] == ["python", "-m", "camserve_tools.servers.model_probe"]
        assert liveness[liveness.index("--envelope") + 1] == envelope
        protocols.add(model["protocolVersion"])
    assert protocols == {"v1", "v2"}
    knative = [s for s in services if "serving.kserve.io/deploymentMode" not in s["metadata"].get("annotations", {})]
    assert all(s["spec"]["predictor"]["scaleMetric"] == "concurrency" for s in knative)
    assert len(knative) == 2
    (standard,) = [s for s in services if s["metadata"]["annotations"].get("serving.kserve.io/deploymentMode") == "Standard"]
    metrics = standard["spec"]["predictor"]["autoScaling"]["metrics"]
    prometheus = [m["external"]["metric"] for m in metrics if m["type"] == "External"]
    assert prometheus
    assert prometheus[0]["backend"] == "prometheus"
    assert "ts_queue_latency_microseconds" in prometheus[0]["query"]


def test_kserve_runtime() -> None:
    """KServe's container name, our image's engine and configs, the metrics port, a read-only root."""
    spec = runtime_named("camserve-torchserve")["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CAMSERVE_ENGINE"] == "torchserve"
    assert (ROOT / "config" / Path(env["CAMSERVE_CONFIG"]).name).is_file()
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["runAsNonRoot"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    assert spec["annotations"]["prometheus.kserve.io/port"] == "8082"
    for name in ("kserve.properties", "kserve-v2.properties"):
        assert dict(read_properties(ROOT / "config" / name)).get("disable_token_authorization") == "true", name


def test_kubernetes_deployment() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("camserve:"), "the image's entry point serves"
    assert "command" not in container, "the image's entry point serves"
    assert {"name": "CAMSERVE_CONFIG", "value": "/etc/camserve/config.properties"} in container["env"]
    # Liveness proves a real answer too: TorchServe can lose a model while /ping stays healthy (model_probe).
    assert container["livenessProbe"]["exec"]["command"][:3] == ["python", "-m", "camserve_tools.servers.model_probe"]
    assert container["livenessProbe"]["timeoutSeconds"] > 20
    assert container["livenessProbe"]["failureThreshold"] >= 3
    assert container["readinessProbe"]["exec"]["command"] == ["python", "-m", "camserve_tools.container.probe", "shapes", "imagenet"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert {mount["mountPath"] for mount in container["volumeMounts"]} == {"/etc/camserve", "/tmp"}
    assert any("emptyDir" in volume for volume in pod["volumes"])
    # preStop, drain and stop (the entry point's defaults) fit inside the grace period.
    assert pod["terminationGracePeriodSeconds"] > 5 + 30 + 10
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    assert one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_metrics_port_is_on_no_service() -> None:
    """Metrics carry the hostname and error counts: Prometheus scrapes the pods, no Service exposes 8082."""
    for service in by_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert all(port["port"] != 8082 and port.get("targetPort") not in (8082, "metrics") for port in service["spec"]["ports"])
    policy = one("NetworkPolicy")
    metrics_rules = [rule for rule in policy["spec"]["ingress"] if any(port["port"] == 8082 for port in rule["ports"])]
    assert metrics_rules
    assert all(source.get("namespaceSelector") for rule in metrics_rules for source in rule["from"])


def test_kubernetes_config_carries_production_settings() -> None:
    """configmap.yaml's config.properties is production.properties plus pod addresses; tokens off is the one exception."""
    config_map = next(c for c in by_kind("ConfigMap") if "config.properties" in c["data"])
    ours = dict(
        line.split("=", 1) for line in config_map["data"]["config.properties"].splitlines() if "=" in line and not line.startswith("#")
    )
    documented_exceptions = {"disable_token_authorization"}
    for key, value in read_properties(ROOT / "config" / "production.properties"):
        if key not in documented_exceptions:
            assert ours.get(key) == value, key
    assert ours["disable_token_authorization"] == "true"
    assert ours["management_address"].startswith("http://127.0.0.1:")


def test_the_native_runtime_and_its_inference_service() -> None:
    """camserve's own ClusterServingRuntime (KServe's model server hosting the pipeline) and a service that names it."""
    runtime = runtime_named("camserve")
    (container,) = runtime["spec"]["containers"]
    assert container["command"] == ["python", "-m", "camserve.engines.kserve_model"]
    assert container["args"][:2] == ["--model-store", "/mnt/models"]
    assert "--grpc-listen-port" in container["args"]
    assert container["securityContext"]["runAsNonRoot"]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert {"v1", "v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (service,) = [s for s in by_kind("InferenceService") if s["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]]
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] in formats
    assert model["storageUri"]
    assert model["readinessProbe"]["httpGet"]["path"] == "/v2/models/shapes/ready"
