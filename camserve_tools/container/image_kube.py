"""`make image-test`'s checks of the image as the manifests run it: KServe's runtimes and deploy/kubernetes's pod.

Each container is made as its manifests make it (read-only root, writable only where an emptyDir is declared, the
manifest's command and args), and driven from outside with the requests and probes the manifests name.
"""

from __future__ import annotations

import copy
import json
import secrets
import time

import requests
import yaml

from camserve_tools.container.image_harness import ROOT, WORK_DIR, Container, Report, podman
from camserve_tools.servers.model_probe import answer_problem, envelope_of, request_for
from camserve_tools.servers.torchserve import free_port, sample_image_png

# --- the pod of deploy/kubernetes --------------------------------------------------------------------------------


def pod_manifest(image: str, suffix: str, port: int, metrics_port: int) -> list[dict]:
    """deploy/kubernetes's ConfigMap and Deployment for `podman kube play`: one replica of the image built here
    (kustomization.yaml's images entry applied), hostPorts on loopback, names of their own."""
    kubernetes = ROOT / "deploy" / "kubernetes"
    (config_map,) = [d for d in yaml.safe_load_all((kubernetes / "configmap.yaml").read_text()) if d]
    (deployment,) = [d for d in yaml.safe_load_all((kubernetes / "deployment.yaml").read_text()) if d]
    (kustomization,) = [d for d in yaml.safe_load_all((kubernetes / "kustomization.yaml").read_text()) if d]
    config_map, deployment = copy.deepcopy(config_map), copy.deepcopy(deployment)
    config_map["metadata"]["name"] += f"-{suffix}"
    deployment["metadata"]["name"] += f"-{suffix}"
    deployment["spec"]["replicas"] = 1
    pod = deployment["spec"]["template"]["spec"]
    for volume in pod["volumes"]:
        if "configMap" in volume:
            volume["configMap"]["name"] = config_map["metadata"]["name"]
    (container,) = pod["containers"]
    (entry,) = kustomization["images"]
    name, _, _ = container["image"].partition(":")
    assert name == entry["name"], f"the Deployment's image {container['image']} is not kustomization.yaml's {entry['name']}"
    container["image"] = image
    for entry_port in container["ports"]:
        entry_port["hostIP"] = "127.0.0.1"
        entry_port["hostPort"] = port if entry_port["containerPort"] == 8080 else metrics_port
    return [config_map, deployment]


def check_kube_play(image: str, report: Report) -> None:
    suffix = secrets.token_hex(3)
    port, metrics_port = free_port(), free_port()
    documents = pod_manifest(image, suffix, port, metrics_port)
    deployment = documents[1]
    manifest = WORK_DIR / "kube-play.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    spec = deployment["spec"]["template"]["spec"]
    container_spec = spec["containers"][0]
    try:
        played = podman("kube", "play", str(manifest), check=False, timeout=300)
        if not report.check("kube play: the Deployment's pod runs", played.returncode == 0, (played.stdout + played.stderr)[-600:]):
            return
        # `kube play` prints the pod's id, then its containers' ids; ours is the one that is not the pod's infra.
        pod_id = played.stdout.split("Pod:", 1)[1].split()[0]
        containers = podman("ps", "--filter", f"pod={pod_id}", "--format", "{{.Names}} {{.IsInfra}}").stdout.split("\n")
        (container_name,) = [line.split()[0] for line in containers if line.strip().endswith("false")]
        runner = Container(image, container_name)
        runner.port = port

        def ready() -> str:
            # First until the pod serves both models through its hostPort (the start-up period, which the startup
            # probe covers in a cluster): the readiness command's own 4 s timeout is meant for a warm pod.

            deadline = time.monotonic() + 420
            for model in ("shapes", "imagenet"):
                while True:
                    try:
                        url = f"http://127.0.0.1:{port}/predictions/{model}"
                        if requests.post(url, data=sample_image_png(), timeout=60).status_code == 200:
                            break
                    except requests.RequestException:
                        pass
                    if time.monotonic() > deadline or runner.state() != "running":
                        raise AssertionError(f"{model} never answered through the hostPort; {runner.state()}; {runner.logs()[-1500:]}")
                    time.sleep(2)
            command = container_spec["readinessProbe"]["exec"]["command"]
            for _ in range(container_spec["readinessProbe"].get("failureThreshold", 3)):
                result = runner.exec(*command, timeout=30)
                if result.returncode == 0:
                    return f"`{' '.join(command)}` exit 0 inside the pod"
                time.sleep(container_spec["readinessProbe"].get("periodSeconds", 10))
            raise AssertionError(f"exit {result.returncode}: {result.stdout[-300:]}")

        report.run("kube play: the readiness command passes inside the pod", ready)

        def live() -> str:
            command = container_spec["livenessProbe"]["exec"]["command"]
            result = runner.exec(*command, timeout=60)
            assert result.returncode == 0, f"exit {result.returncode}: {result.stdout[-300:]}"
            return f"`{' '.join(command)}` exit 0 inside the pod"

        report.run("kube play: the liveness command passes inside the pod", live)

        def as_declared() -> str:
            uid = runner.exec("id", "-u").stdout.strip()
            assert uid == str(spec["securityContext"]["runAsUser"]), f"runs as uid {uid}"
            writable = runner.exec("touch", "/opt/camserve/x")
            assert writable.returncode != 0, "the root filesystem is writable"

            answer = requests.post(f"http://127.0.0.1:{port}/predictions/shapes", data=sample_image_png(), timeout=60)
            assert answer.status_code == 200, f"through the hostPort: HTTP {answer.status_code}"
            assert "cam" in answer.json(), "through the hostPort: an answer without a map"
            return f"uid {uid}, read-only root, tokens off as the ConfigMap says: a map through the hostPort"

        report.run("kube play: security context and ConfigMap applied", as_declared)
    finally:
        podman("kube", "down", str(manifest), check=False, timeout=120)


# --- KServe: the ClusterServingRuntime's container, as an InferenceService of protocol v1 configures it ---------------


def runtime_container(name: str) -> dict:
    """The container of deploy/kserve's ClusterServingRuntime `name`."""
    for path in sorted((ROOT / "deploy" / "kserve").glob("clusterservingruntime-*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["metadata"]["name"] == name:
                (container,) = document["spec"]["containers"]
                return {**container, "volumes": document["spec"].get("volumes", [])}
    raise LookupError(f"no ClusterServingRuntime {name} under deploy/kserve")


def inference_service(filename: str) -> dict:
    (service,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kserve" / filename).read_text()) if d]
    return service


def pod_like_run_args(container: dict, image: str, extra: list[str]) -> list[str]:
    """podman options that make a container as a pod would: no tmpfs but the manifest's emptyDirs (podman --read-only
    would add one at /tmp by itself), then the image, its command and args."""
    empty_dirs = {volume["name"] for volume in container["volumes"] if "emptyDir" in volume}
    args = ["--read-only-tmpfs=false"]
    args += [f"--tmpfs={mount['mountPath']}" for mount in container.get("volumeMounts", []) if mount["name"] in empty_dirs]
    if "command" in container:
        args += ["--entrypoint", json.dumps(container["command"])]
    return [*args, *extra, image, *container.get("args", [])]


def wait_for_kserve_answer(container: Container, protocol: str) -> float:
    """Seconds from the container's start to its first answer with a map on KServe's route of `protocol`."""
    path, body, headers = request_for("shapes", protocol)
    deadline = time.monotonic() + 300
    while True:
        try:
            response = requests.post(container.url + path, data=body, headers=headers, timeout=30)
            if response.status_code == 200 and answer_problem(envelope_of(protocol), response.json()) is None:
                return time.monotonic() - container.started_at
        except (requests.RequestException, ValueError):
            pass
        assert container.state() == "running", container.logs()[-2000:]
        assert time.monotonic() < deadline, f"no answer with a map within 300 s: {container.logs()[-2000:]}"
        time.sleep(0.5)


def check_torchserve_runtime(image: str, protocol: str) -> str:
    """The camserve-torchserve runtime's container as an InferenceService of `protocol` configures it answers KServe's
    route with a map and a 4xx for a body that is not JSON, and the service's readiness command passes inside it."""
    spec = runtime_container("camserve-torchserve")
    model = inference_service(f"inferenceservice-{protocol}.yaml")["spec"]["predictor"]["model"]
    env = {e["name"]: e["value"] for e in [*spec["env"], *model["env"]]}
    name = f"camserve-image-test-kserve-{secrets.token_hex(3)}"
    container = Container(image, name, env, pod_like_run_args(spec, image, []))
    path = request_for("shapes", protocol)[0]
    try:
        container.run()
        started = wait_for_kserve_answer(container, protocol)
        command = model["readinessProbe"]["exec"]["command"]
        ready = container.exec(*command)
        assert ready.returncode == 0, f"readiness `{' '.join(command)}`: {ready.stdout[-300:]}"
        garbage = requests.post(container.url + path, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
        assert 400 <= garbage.status_code < 500, f"a body that is not JSON: HTTP {garbage.status_code} {garbage.text[:200]}"
        return f"POST {path}: predictions and a map after {started:.1f} s; readiness command exit 0; not JSON: {garbage.status_code}"
    finally:
        container.remove()


def check_native_runtime(image: str) -> str:
    """The `camserve` runtime's container (KServe's model server, the manifest's command and args) with the archives
    where the storage initializer puts them: v2 and v1 answers with a map, and inferenceservice-native's readiness
    path answers 200."""
    spec = runtime_container("camserve")
    model = inference_service("inferenceservice-native.yaml")["spec"]["predictor"]["model"]
    env = {e["name"]: e["value"] for e in spec.get("env", [])}
    store = f"{ROOT / 'model_store'}:/mnt/models:ro"
    name = f"camserve-image-test-native-{secrets.token_hex(3)}"
    container = Container(image, name, env, pod_like_run_args(spec, image, ["-v", store]))
    try:
        container.run()
        started = wait_for_kserve_answer(container, "v2")
        path, body, headers = request_for("shapes", "v1")
        v1 = requests.post(container.url + path, data=body, headers=headers, timeout=60)
        assert v1.status_code == 200, f"v1: HTTP {v1.status_code}"
        readiness = model["readinessProbe"]["httpGet"]["path"]
        ready = requests.get(container.url + readiness, timeout=30)
        assert ready.status_code == 200, f"GET {readiness}: HTTP {ready.status_code}"
        return f"v2 infer with a map after {started:.1f} s, v1 predict 200, GET {readiness} 200"
    finally:
        container.remove()


def check_engine_refusal(image: str) -> str:
    result = podman("run", "--rm", "-e", "CAMSERVE_ENGINE=triton", image, check=False, timeout=120)
    message = "CAMSERVE_ENGINE='triton' is not available in this image"
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-500:]}"
    assert message in result.stderr, result.stderr[-500:]
    return f"exit 2: {result.stderr.strip().splitlines()[-1]}"
