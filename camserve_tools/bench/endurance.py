"""Endurance and fault checks against a real TorchServe: soak (worker memory), batch integrity, worker kill.

    python -m camserve_tools.bench.endurance                                   # full: 10,000-request soak, 2,000 integrity
    python -m camserve_tools.bench.endurance --soak 1000 --integrity 200       # shorter
Writes docs/lab/endurance.md and docs/lab/endurance-rss.png. tests/test_endurance.py runs short versions in CI.

- Soak: requests mixing methods and outputs; the worker's RSS is sampled as it goes. Growth is measured from the
  end of warm-up (the first 10 %) to the end.
- Batch integrity (batchSize 8): every request carries an image of a size no other request has, so an answer
  matched to the wrong request shows as a wrong `size` - whatever the model predicts.
- Worker kill: SIGKILL the worker under load; TorchServe must start a new one and answer again within a bound,
  and no request may hang past responseTimeout.

No locust here (it monkey-patches gevent): plain threads and requests, bounded in count and time.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests
import yaml

from camserve_tools.data.scenes import EVAL_SEED_START, make_scene
from camserve_tools.servers.torchserve import TorchServe

ROOT = Path(__file__).resolve().parents[2]
SEED_START = EVAL_SEED_START + 8_000_000
MIX = [
    {},
    {"X-CAM-Method": "cam"},
    {"X-CAM-Method": "none"},
    {"X-CAM-Output": "grid"},
    {"Accept": "image/png"},
    {"X-CAM-Method": "layercam"},
    {"X-CAM-Maps": "2"},
]


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def serving(batch_size: int = 1, max_batch_delay: int = 20) -> Iterator[TorchServe]:
    """A private TorchServe of the default model with the given batching."""
    work = Path(tempfile.mkdtemp(prefix="camserve-endurance-"))
    from camserve_tools.archive.packing import build_archive

    model_dir = work / "model"
    shutil.copytree(ROOT / "models" / "shapes", model_dir)
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    config.update(batchSize=batch_size, maxBatchDelay=max_batch_delay)
    (model_dir / "model-config.yaml").write_text(yaml.safe_dump(config))
    mar = build_archive("shapes", model_dir, work / "store")
    server = TorchServe.on_free_ports(
        run_dir=work / "server",
        config=ROOT / "config" / "dev.properties",
        model_store=mar.parent,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def worker_processes(server: TorchServe) -> list[psutil.Process]:
    return [psutil.Process(pid) for pid in server.worker_pids()]


@dataclass
class Soak:
    requests: int
    failures: int
    curve: list[tuple[int, float]] = field(default_factory=list)  # (requests done, worker RSS MiB)

    @property
    def growth(self) -> float:
        """RSS growth from the end of warm-up (first 10 % of samples) to the end, as a fraction."""
        warm = self.curve[max(1, len(self.curve) // 10)][1]
        return (self.curve[-1][1] - warm) / warm


def soak(server: TorchServe, total: int, concurrency: int = 4, samples: int = 50) -> Soak:
    images = [png(make_scene(SEED_START + i).image) for i in range(32)]
    url = f"{server.inference_url}/predictions/shapes"
    result = Soak(requests=total, failures=0)
    lock = threading.Lock()
    done = 0

    def one(i: int) -> None:
        nonlocal done
        response = requests.post(url, data=images[i % len(images)], headers=MIX[i % len(MIX)], timeout=120)
        with lock:
            done += 1
            result.failures += response.status_code != 200
            if done % max(1, total // samples) == 0:
                result.curve.append((done, sum(p.memory_info().rss for p in worker_processes(server)) / 2**20))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(total)))
    return result


def batch_integrity(server: TorchServe, total: int, concurrency: int = 16) -> tuple[int, int]:
    """(mismatched answers, failures) over `total` concurrent requests whose images all differ in size."""
    url = f"{server.inference_url}/predictions/shapes"

    def one(i: int) -> tuple[bool, bool]:
        size = (160 + i % 400, 160 + i // 400)  # unique per request
        response = requests.post(url, data=png(make_scene(SEED_START + 100_000 + i, size=size).image), headers=MIX[i % 2], timeout=120)
        if response.status_code != 200:
            return False, True
        return response.json()["cam"]["size"] != list(size), False

    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, range(total)))
    return sum(m for m, _ in outcomes), sum(f for _, f in outcomes)


@dataclass
class Kill:
    recovered_s: float  # from the kill until the first success after it
    failed: int  # requests that failed (in flight on the killed worker)
    slowest_s: float  # no request may hang past responseTimeout
    requests: int


def worker_kill(server: TorchServe, duration: float = 30.0, concurrency: int = 4) -> Kill:
    image = png(make_scene(SEED_START).image)
    url = f"{server.inference_url}/predictions/shapes"
    stop_at = time.monotonic() + duration
    log: list[tuple[float, float, bool]] = []  # (start, end, ok)

    def client() -> None:
        while time.monotonic() < stop_at:
            start = time.monotonic()
            try:
                ok = requests.post(url, data=image, timeout=90).status_code == 200
            except requests.RequestException:
                ok = False
            log.append((start, time.monotonic(), ok))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(duration / 4)
    killed_at = time.monotonic()
    for worker in worker_processes(server):
        os.kill(worker.pid, signal.SIGKILL)
    for thread in threads:
        thread.join()
    after = sorted(end for start, end, ok in log if ok and start > killed_at)
    return Kill(
        recovered_s=(after[0] - killed_at) if after else float("inf"),
        failed=sum(not ok for _, _, ok in log),
        slowest_s=max(end - start for start, end, _ in log),
        requests=len(log),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak", type=int, default=10_000)
    parser.add_argument("--integrity", type=int, default=2_000)
    parser.add_argument("--kill-seconds", type=float, default=30.0)
    args = parser.parse_args()
    with serving() as server:
        started = time.monotonic()
        soaked = soak(server, args.soak)
        soak_s = time.monotonic() - started
        killed = worker_kill(server, args.kill_seconds)
    with serving(batch_size=8, max_batch_delay=50) as server:
        mismatched, failed = batch_integrity(server, args.integrity)

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot([n for n, _ in soaked.curve], [rss for _, rss in soaked.curve])
    axis.set_xlabel("requests")
    axis.set_ylabel("worker RSS (MiB)")
    axis.set_title(f"soak: {soaked.requests} mixed requests, RSS growth after warm-up {soaked.growth:+.1%}")
    figure.tight_layout()
    figure.savefig(ROOT / "docs" / "lab" / "endurance-rss.png", dpi=100)
    rows = "\n".join(
        [
            f"| soak: {soaked.requests} requests mixing methods and outputs, 4 clients | {soaked.failures} failures, "
            f"{soak_s:.0f} s, worker RSS {soaked.curve[0][1]:.0f} -> {soaked.curve[-1][1]:.0f} MiB, "
            f"growth after warm-up {soaked.growth:+.2%} (target < 5 %) |",
            f"| batch integrity: {args.integrity} concurrent requests, batchSize 8, every image a different size | "
            f"{mismatched} answers matched to the wrong request, {failed} failures |",
            f"| worker SIGKILLed under load (4 clients, {args.kill_seconds:.0f} s) | answering again "
            f"{killed.recovered_s:.1f} s after the kill; {killed.failed} of {killed.requests} requests failed (those in flight); "
            f"slowest request {killed.slowest_s:.1f} s (responseTimeout 60 s) |",
        ]
    )
    report = f"""# Endurance and faults

Reproduce: `.venv/bin/python -m camserve_tools.bench.endurance --soak {args.soak} --integrity {args.integrity}` (this machine:
2 CPU cores; one worker; short versions of each run in CI as tests/test_endurance.py).

| check | result |
|---|---|
{rows}

![worker RSS during the soak](endurance-rss.png)
"""
    # Later sections (the hostile-request suite's figures) are other runs': keep them.
    doc = ROOT / "docs" / "lab" / "endurance.md"
    existing = doc.read_text() if doc.exists() else ""
    kept = existing[existing.index("\n## ") :] if "\n## " in existing else ""
    doc.write_text(report + kept)
    print(report)


if __name__ == "__main__":
    main()
