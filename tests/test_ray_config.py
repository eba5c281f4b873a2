"""deploy/ray/: the Serve config loads in Ray's own schema and builds camserve's applications; the RayService carries
the same applications and passes every check this machine can run (no Kubernetes, no KubeRay); the checker catches
mistakes Ray's and KubeRay's schemas would otherwise let through. No cluster is started here."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest
import yaml
from support import ROOT

from camserve_tools.deploy.manifests import KUBERAY_CRDS, check_against_crd, check_document, check_serve_config
from camserve_tools.servers.ray_cluster import RayCluster

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray[serve]==2.60.0' (pinned in pyproject.toml)")

SERVE_CONFIG = ROOT / "deploy" / "ray" / "serve-config.yaml"
RAY_SERVICE = ROOT / "deploy" / "ray" / "rayservice.yaml"


def serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def ray_service() -> dict:
    return yaml.safe_load(RAY_SERVICE.read_text())


def test_the_serve_config_loads_in_rays_schema_and_autoscales_every_model() -> None:
    config = serve_config()
    assert check_serve_config(config, "serve-config") == []
    applications = {app["name"]: app for app in config["applications"]}
    assert applications["camserve"]["route_prefix"] == "/"
    assert applications["camserve"]["args"]["models"] == ["shapes", "imagenet"]
    for model in ("shapes", "imagenet"):
        app = applications[model]
        assert app["route_prefix"] == f"/predictions/{model}"
        assert app["args"]["name"] == model
        (deployment,) = app["deployments"]
        scaling = deployment["autoscaling_config"]
        assert deployment["name"] == model
        assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
        assert scaling["target_ongoing_requests"] <= deployment["max_ongoing_requests"]
        assert set(deployment["user_config"]) == {"max_batch_size", "batch_wait_timeout_s"}
    assert config["http_options"]["host"] == "127.0.0.1"


def test_the_builders_make_one_deployment_per_model_named_after_it() -> None:
    from ray.serve._private.build_app import build_app

    from camserve.engines.ray_deployment import model_app, router_app

    for app in serve_config()["applications"]:
        builder = {"camserve.engines.ray_deployment:model_app": model_app, "camserve.engines.ray_deployment:router_app": router_app}
        built = build_app(builder[app["import_path"]](app["args"]), name=app["name"])
        assert [deployment.name for deployment in built.deployments] == [deployment["name"] for deployment in app["deployments"]]


def test_the_ray_service_carries_the_same_applications() -> None:
    service = ray_service()
    assert check_document(service) == []
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert served["applications"] == serve_config()["applications"]
    assert served["proxy_location"] == "EveryNode"
    assert served["http_options"]["host"] == "0.0.0.0"
    cluster = service["spec"]["rayClusterConfig"]
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"ray[serve]=={cluster['rayVersion']}" in pins
    assert cluster["rayVersion"] == ray.__version__
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] >= 2, "a lost worker pod must leave a replica of every model on another"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_checker_catches_what_the_schemas_let_through() -> None:
    service = ray_service()

    def problems(change) -> list[str]:
        document = copy.deepcopy(service)
        change(document)
        return check_document(document)

    spec = "spec"

    def workers(d: dict) -> dict:
        return d[spec]["rayClusterConfig"]["workerGroupSpecs"][0]

    def head(d: dict) -> dict:
        return d[spec]["rayClusterConfig"]["headGroupSpec"]

    assert any("maxReplica: unknown field" in p for p in problems(lambda d: workers(d).update(maxReplica=3)))
    assert any("num-cpus: a string" in p for p in problems(lambda d: head(d)["rayStartParams"].update({"num-cpus": 0})))

    def misspelt(d: dict) -> None:
        d[spec].update(serveConfigV2=d[spec]["serveConfigV2"].replace("autoscaling_config", "autoscalling_config", 1))

    assert any("autoscalling_config: Ray Serve's config has no such field" in p for p in problems(misspelt))
    container = problems(lambda d: workers(d)["template"]["spec"]["containers"][0].update(imagePullPolicies="x"))
    assert any("imagePullPolicies" in p for p in container)
    assert "spec.rayClusterConfig: required" in problems(lambda d: d[spec].pop("rayClusterConfig"))


def test_the_ray_service_against_kuberays_crd() -> None:
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"no KubeRay CRDs at {KUBERAY_CRDS}: the RayService was checked by KubeRay's field names only")
    service = ray_service()
    assert check_against_crd(service, KUBERAY_CRDS) == []
    wrong = copy.deepcopy(service)
    wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert check_against_crd(wrong, KUBERAY_CRDS)


def test_the_local_cluster_deploys_the_same_config_with_its_own_port_models_and_replicas(tmp_path: Path) -> None:
    archives = {"shapes": ROOT / "model_store" / "shapes.mar", "mine": tmp_path / "mine.mar"}
    config = RayCluster(run_dir=tmp_path, archives=archives, nodes=2, inference_port=18123).application_config()
    assert check_serve_config(config, "local") == []
    assert config["http_options"]["host"] == "127.0.0.1"
    assert config["http_options"]["port"] == 18123
    applications = {app["name"]: app for app in config["applications"]}
    assert set(applications) == {"camserve", "shapes", "mine"}
    assert applications["camserve"]["args"]["models"] == ["shapes", "mine"]
    mine = applications["mine"]
    assert mine["route_prefix"] == "/predictions/mine"
    assert mine["args"]["source"] == "mine.mar"
    assert mine["args"]["model_store"] == str(tmp_path)
    for name in ("shapes", "mine"):
        (deployment,) = applications[name]["deployments"]
        assert deployment["name"] == name, "a replica per node at least"
        assert deployment["autoscaling_config"]["min_replicas"] == 2, "a replica per node at least"
    fixed = RayCluster(run_dir=tmp_path, archives={"shapes": archives["shapes"]}, deployment_options={"shapes": {"num_replicas": 1}})
    (deployment,) = {app["name"]: app for app in fixed.application_config()["applications"]}["shapes"]["deployments"]
    assert deployment["num_replicas"] == 1
    assert "autoscaling_config" not in deployment
