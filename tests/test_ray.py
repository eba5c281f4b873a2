"""Ray Serve hosting the pipeline on a real two-node Ray cluster on loopback (camserve_tools/servers/ray_cluster.py), both
default models deployed from serve-config.yaml: replicas on both nodes and both answering right, no listener beyond
loopback, autoscaling under load and back, a node lost under load, and a stop that leaves no process behind. One
cluster for the module; the node is lost last. The request bounds of the Ray path are checked on the one-node
cluster of the engine suites (conftest's ray_engine).
"""

from __future__ import annotations

import io
import json
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from support import IMAGENET_MAR, SHAPES_MAR, png_bytes, require_archive, start_ray_engine, stopped_after

from camserve_tools.data.photos import LABELLED
from camserve_tools.servers.ray_cluster import RayCluster, processes_marked

pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray[serve]==2.60.0' (pinned in pyproject.toml)")
pytestmark = pytest.mark.server

NODES = {"head", "worker-1"}
# shapes scales between two and three replicas on little load, quickly; imagenet keeps two.
AUTOSCALING = {"min_replicas": 2, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 1, "downscale_delay_s": 4}
AUTOSCALING |= {"look_back_period_s": 12}  # over Serve's metrics_interval_s (10 s), which it still checks it against
# Serve's autoscaler sees the load within a second instead of ten.
QUICK_METRICS = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    for archive in (SHAPES_MAR, IMAGENET_MAR):
        require_archive(archive)
    with stopped_after(
        start_ray_engine(
            tmp_path_factory.mktemp("ray-cluster"),
            {"shapes": SHAPES_MAR, "imagenet": IMAGENET_MAR},
            nodes=2,
            deployment_options={"shapes": {"autoscaling_config": AUTOSCALING}, "imagenet": {"num_replicas": 2}},
            env=QUICK_METRICS,
        )
    ) as cluster:
        yield cluster


def coffee_jpeg() -> tuple[bytes, frozenset[str]]:
    photo = next(photo for photo in LABELLED if photo.name == "coffee")
    buffer = io.BytesIO()
    photo.image().save(buffer, format="JPEG", quality=92)
    return buffer.getvalue(), photo.family


@dataclass
class Answered:
    """One request under load: when it was sent, its status (0: no HTTP answer), where it was computed, and whether
    the answer was right."""

    sent: float
    model: str
    status: int
    node: str = ""
    replica: str = ""
    right: bool = False


@dataclass
class Load:
    """`users` clients per model posting real images in a loop until stopped; every answer is checked."""

    url: str
    bodies: dict[str, list[tuple[bytes, dict]]]  # model -> (body, what the answer must say)
    users: int = 6
    answers: list[Answered] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.users * len(self.bodies))
        self.futures = [self.pool.submit(self._user, model, index) for model in self.bodies for index in range(self.users)]

    def _user(self, model: str, index: int) -> None:
        session = requests.Session()
        cases = self.bodies[model]
        turn = index
        while not self.stopping.is_set():
            body, expected = cases[turn % len(cases)]
            turn += 1
            sent = time.monotonic()
            try:
                response = session.post(f"{self.url}/predictions/{model}", data=body, timeout=60)
            except requests.RequestException:
                self.answers.append(Answered(sent, model, 0))
                session = requests.Session()
                continue
            answered = Answered(sent, model, response.status_code, response.headers.get("x-cam-node", ""))
            answered.replica = response.headers.get("x-cam-replica", "")
            if response.status_code == 200:
                answered.right = right_answer(response.json(), expected)
            self.answers.append(answered)

    def stop(self) -> list[Answered]:
        self.stopping.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()
        return sorted(self.answers, key=lambda answer: answer.sent)


def right_answer(body: dict, expected: dict) -> bool:
    """The answer of a reference request, within batching's float noise: the same top-1, the map of the same size
    and class, the probability within 1e-3."""
    top, reference = body["predictions"][0], expected["predictions"][0]
    return (
        top["index"] == reference["index"]
        and abs(top["probability"] - reference["probability"]) < 1e-3
        and body["cam"]["size"] == expected["cam"]["size"]
        and body["cam"]["index"] == expected["cam"]["index"]
    )


class Watch:
    """The cluster's replica counts, one line a second, read in the background while a test runs."""

    def __init__(self, cluster: RayCluster) -> None:
        self.process = cluster.watch(interval=1.0)
        self.lines: list[dict] = []
        self.started = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not line.startswith("{"):
                continue  # Ray's own words on a driver's stdout
            record = json.loads(line)
            record["at"] = round(time.monotonic() - self.started, 1)
            self.lines.append(record)

    def running(self, deployment: str) -> int:
        counts = self.lines[-1].get("replicas", {}).get(deployment, {}) if self.lines else {}
        return counts.get("RUNNING", 0)

    def settled(self, deployment: str, replicas: int) -> bool:
        counts = self.lines[-1].get("replicas", {}).get(deployment, {}) if self.lines else {}
        return counts == {"RUNNING": replicas}

    def wait_for(self, condition, timeout: float, what: str) -> float:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what} not within {timeout:.0f} s; replica counts: {self.timeline()}"
            time.sleep(0.5)
        return time.monotonic()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # the watch's own way out; a Ray driver on SIGTERM prints a stack
        self.process.wait(timeout=30)

    def timeline(self, deployment: str = "shapes") -> str:
        """`at s: RUNNING/STARTING/STOPPING` whenever the deployment's counts changed."""
        points, last = [], None
        for line in self.lines:
            counts = line.get("replicas", {}).get(deployment, line.get("error"))
            if counts != last:
                points.append(f"{line['at']} s: {counts}")
                last = counts
        return "; ".join(points)


@pytest.fixture(scope="module")
def references(cluster: RayCluster, scenes) -> dict[str, list[tuple[bytes, dict]]]:
    """Each model's request bodies with their answers, asked one at a time (a batch of one)."""
    shapes = [png_bytes(scene.image) for scene in scenes[:6]]
    coffee, _ = coffee_jpeg()
    result = {}
    for model, bodies in (("shapes", shapes), ("imagenet", [coffee])):
        result[model] = [
            (body, requests.post(f"{cluster.inference_url}/predictions/{model}", data=body, timeout=60).json()) for body in bodies
        ]
    return result


def test_two_nodes_two_replicas_per_model_on_different_nodes_both_answer_right(cluster: RayCluster, scenes) -> None:
    counts = cluster.replica_counts()
    assert counts["shapes"] == {"RUNNING": 2}, counts
    assert counts["imagenet"] == {"RUNNING": 2}, counts
    coffee, family = coffee_jpeg()
    cases = {"shapes": [(png_bytes(scene.image), scene.name) for scene in scenes[:6]], "imagenet": [(coffee, None)]}
    for model, bodies in cases.items():
        seen: dict[int, dict[str, bytes]] = {}  # body -> node -> answer
        replicas: dict[str, str] = {}
        for attempt in range(40):
            index = attempt % len(bodies)
            body, label = bodies[index]
            response = requests.post(f"{cluster.inference_url}/predictions/{model}", data=body, timeout=60)
            assert response.status_code == 200, response.text[:300]
            answer = response.json()
            top = answer["predictions"][0]["label"]
            assert top == label if label else top in family, (model, top)
            node = response.headers["x-cam-node"]
            seen.setdefault(index, {})[node] = response.content
            replicas[response.headers["x-cam-replica"]] = node
            if attempt >= 2 * len(bodies) and set(replicas.values()) == NODES:
                break
        assert set(replicas.values()) == NODES, f"{model}: replicas and their nodes {replicas}"
        assert len(replicas) == 2, f"{model}: replicas and their nodes {replicas}"
        for index, by_node in seen.items():
            assert len(set(by_node.values())) == 1, f"{model} image {index}: the nodes' answers differ"


def test_no_listener_of_the_cluster_is_beyond_loopback(cluster: RayCluster) -> None:
    pids = {process.pid for process in cluster.processes()}
    listeners = [
        (c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    assert any(port == cluster.inference_port for _, port, _ in listeners), "the proxy listens"
    assert len({pid for _, _, pid in listeners}) >= 8, f"too few listening processes found: {listeners}"
    beyond = [(ip, port, psutil.Process(pid).name()) for ip, port, pid in listeners if ip not in LOOPBACK]
    assert beyond == [], f"listening beyond loopback: {beyond}"


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(cluster: RayCluster, references) -> None:
    watch = Watch(cluster)
    try:
        watch.wait_for(lambda: watch.settled("shapes", 2), 60, "shapes at rest with two replicas")
        load = Load(cluster.inference_url, {"shapes": references["shapes"]}, users=10)
        try:
            up = watch.wait_for(lambda: watch.running("shapes") >= 3, 180, "a third shapes replica under load")
            time.sleep(5)
        finally:
            answers = load.stop()
        stopped = time.monotonic()
        down = watch.wait_for(lambda: watch.settled("shapes", 2), 180, "shapes back to two replicas")
        print(f"\nshapes replicas over time: {watch.timeline()}")
        print(f"up {up - watch.started:.0f} s after the load began; down {down - stopped:.0f} s after it ended; {len(answers)} requests")
    finally:
        watch.stop()
    assert all(answer.status == 200 and answer.right for answer in answers), Counter((a.status, a.right) for a in answers)
    assert len({answer.replica for answer in answers}) >= 3, "the third replica answered too"


def test_losing_a_node_under_load(cluster: RayCluster, references) -> None:
    """SIGKILL to every process of worker-1 (raylet, agents, its replicas) while both models are under load: Serve
    replaces the replicas on the head; failed requests are counted, recovery timed, and no answer is wrong."""
    watch = Watch(cluster)
    try:
        watch.wait_for(lambda: watch.settled("shapes", 2) and watch.settled("imagenet", 2), 120, "both models at rest")
        load = Load(cluster.inference_url, references, users=3)
        try:
            time.sleep(5)
            killed_at = time.monotonic()
            killed = cluster.kill_node("worker-1")
            assert killed, "worker-1 had processes to kill"
            # imagenet keeps a replica on each node: Serve must first see its replica on worker-1 gone.
            noticed = watch.wait_for(lambda: not watch.settled("imagenet", 2), 180, "Serve noticing the lost imagenet replica")
            recovered = watch.wait_for(
                lambda: watch.settled("shapes", 2) and watch.settled("imagenet", 2), 240, "the lost replicas replaced on the head"
            )
            time.sleep(5)
        finally:
            answers = load.stop()
        print(f"\nshapes replicas over time: {watch.timeline()}\nimagenet replicas over time: {watch.timeline('imagenet')}")
    finally:
        watch.stop()
    answered_before = [a for a in answers if a.sent < killed_at and a.status == 200]
    # Requests in flight on worker-1 when it died fail too: they were sent a moment before the kill.
    failed = [a for a in answers if a.status != 200]
    last_failure = max((a.sent for a in failed), default=killed_at)
    settled = [a for a in answers if a.sent > recovered]
    print(
        f"killed {len(killed)} processes of worker-1; of {len(answers)} requests, {len(failed)} failed "
        f"({dict(Counter(a.status for a in failed))}; 0: no HTTP answer), the last sent {last_failure - killed_at:.1f} s after the "
        f"kill; Serve saw the loss {noticed - killed_at:.0f} s after it and had every replica back {recovered - killed_at:.0f} s after it"
    )
    assert {a.node for a in answered_before} == NODES, "both nodes answered before the loss"
    assert all(a.sent > killed_at - 10 for a in failed), "a request failed long before the node was lost"
    assert all(a.right for a in answers if a.status == 200), "an answer was wrong"
    assert settled, Counter((a.status, a.node) for a in settled)
    assert all(a.status == 200 and a.node == "head" for a in settled), Counter((a.status, a.node) for a in settled)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in killed)


def test_stop_leaves_no_process_and_no_listener(cluster: RayCluster) -> None:
    temp_dir = cluster.record()["temp_dir"]
    pids = [process.pid for process in cluster.processes()]
    assert pids
    cluster.stop()
    assert processes_marked(temp_dir) == [], "a process of the cluster outlived stop"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert not Path(temp_dir).exists()
    assert not cluster.record_file.exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", cluster.inference_port)) != 0, "the proxy's port still answers"


# -- the Ray path's request bounds, on the engine suites' one-node cluster ---------------------------------------------


def raw_request(engine: RayCluster, head: bytes) -> bytes:
    """What the server answers to a request's head alone (no body sent), read until it closes or 10 s pass."""
    with socket.create_connection(("127.0.0.1", engine.inference_port), timeout=10) as connection:
        connection.sendall(head)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def test_a_body_over_the_limit_is_refused_before_it_is_read(ray_engine: RayCluster, scenes) -> None:
    (worker,) = ray_engine.worker_pids()
    declared = raw_request(ray_engine, b"POST /predictions/shapes HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
    assert declared.startswith(b"HTTP/1.1 413"), declared[:300]
    assert b'"type":"request_too_large"' in declared, declared[:300]
    limit = ray_engine.max_body_bytes

    def chunks():
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    streamed = requests.post(f"{ray_engine.inference_url}/predictions/shapes", data=chunks(), timeout=120)
    assert streamed.status_code == 413
    assert streamed.json()["type"] == "request_too_large"
    form = requests.post(
        f"{ray_engine.inference_url}/predictions/shapes",
        files={"data": ("scene.png", png_bytes(scenes[0].image))},
        data={"method": "x" * 1_100_000},
        timeout=60,
    )
    assert form.status_code == 400, form.text[:300]
    assert form.json()["code"] == 400, form.text[:300]
    assert requests.post(f"{ray_engine.inference_url}/predictions/shapes", data=png_bytes(scenes[0].image), timeout=60).status_code == 200
    assert ray_engine.worker_pids() == [worker]


def test_routes_methods_and_models_outside_the_protocol_get_json_errors(ray_engine: RayCluster, scenes) -> None:
    url = ray_engine.inference_url
    image = png_bytes(scenes[0].image)
    cases = {
        ("GET", "/predictions/shapes"): (405, "method_not_allowed"),
        ("POST", "/predictions/nothing"): (404, "model_not_found"),
        ("POST", "/explanations/nothing"): (404, "model_not_found"),
        ("POST", "/elsewhere"): (404, "not_found"),
    }
    for (method, path), (status, kind) in cases.items():
        response = requests.request(method, url + path, data=image if method == "POST" else None, timeout=60)
        assert response.status_code == status, (method, path, response.text[:200])
        assert response.json()["type"] == kind, (method, path, response.text[:200])
    explained = requests.post(f"{url}/explanations/shapes", data=image, timeout=60)
    assert explained.status_code == 200
    assert "predictions" not in explained.json()
    assert explained.json()["cam"]
    assert explained.headers["x-cam-node"] == "head"
    assert explained.headers["x-cam-replica"].startswith("shapes#")


def test_camserve_metrics_on_the_nodes_prometheus_endpoint(ray_engine: RayCluster, scenes) -> None:
    url = ray_engine.inference_url
    assert requests.post(f"{url}/predictions/shapes", data=png_bytes(scenes[3].image), headers={"X-CAM-Method": "cam"}, timeout=60).ok
    assert requests.post(f"{url}/predictions/shapes", data=b"not an image", timeout=60).status_code == 400
    wanted = ("ray_camrequests_total{", 'Method="cam"', "ray_camerrors_total{", 'Kind="invalid_image"', "ray_cammaptime_count{")
    deadline = time.monotonic() + 60  # the replica reports to its node's agent every few seconds
    while True:
        text = requests.get(ray_engine.metrics_urls()["head"], timeout=30).text
        if all(part in text for part in wanted) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert all(part in text for part in wanted), [part for part in wanted if part not in text]
    assert 'model_name="shapes"' in text
