"""What KServe's Python model server in front of TorchServe costs, against TorchServe answering KServe's v1 route itself.

    PYTHONPATH=. .venv/bin/python -m camserve_tools.container.runtime_choice [--requests 200]

The stock kserve-torchserve runtime puts a Python model server (its kserve_wrapper) on 8080 in front of TorchServe;
camserve-torchserve ClusterServingRuntime (deploy/kserve/clusterservingruntime-torchserve.yaml) lets TorchServe answer
`POST /v1/models/{name}:predict` on 8080 itself, under its kserve envelope. This starts `make kserve-local`'s pair
(KServe SDK 0.21's model server, camserve_tools.kserve.front, in front of TorchServe with the v1 bundle) on free
ports, and sends the same v1 request alternately through the front and straight to TorchServe, one at a time:
the same TorchServe, the same moment, so the difference is the hop. Prints the latency percentiles of each and the
front's process RSS.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time

import psutil
import requests

from camserve_tools.kserve.bundle import write_bundle
from camserve_tools.kserve.local import KServeLocal
from camserve_tools.servers.torchserve import ROOT, sample_image_png


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per path (default: 200)")
    args = parser.parse_args()
    run_dir = ROOT / ".run" / "runtime-choice"
    write_bundle(run_dir / "bundle", [ROOT / "model_store" / "shapes.mar"], ROOT / "config" / "production.properties", "v1")
    local = KServeLocal.on_free_ports(run_dir=run_dir, bundle=run_dir / "bundle", api="v1")
    body = json.dumps({"instances": [{"data": base64.b64encode(sample_image_png()).decode()}]})
    json_body = {"Content-Type": "application/json"}
    paths = {"KServe model server -> TorchServe": local.url, "TorchServe alone": local.torchserve.inference_url}
    times: dict[str, list[float]] = {name: [] for name in paths}
    local.start()
    try:
        front = psutil.Process(local.front.pid)
        session = requests.Session()
        for _ in range(10):  # warm both paths
            for url in paths.values():
                session.post(f"{url}/v1/models/shapes:predict", data=body, headers=json_body, timeout=60)
        for _ in range(args.requests):
            for name, url in paths.items():
                started = time.perf_counter()
                response = session.post(f"{url}/v1/models/shapes:predict", data=body, headers=json_body, timeout=60)
                times[name].append((time.perf_counter() - started) * 1000)
                if response.status_code != 200 or "cam" not in json.dumps(response.json()):
                    raise RuntimeError(f"{name}: no answer with a map: HTTP {response.status_code} {response.text[:300]}")
        front_rss = front.memory_info().rss / 2**20
    finally:
        local.stop()
    for name, values in times.items():
        print(
            f"{name:36s} p50 {statistics.median(values):6.1f} ms  p95 {percentile(values, 0.95):6.1f} ms  "
            f"mean {statistics.fmean(values):6.1f} ms  ({len(values)} requests)"
        )
    print(f"the KServe model server's RSS: {front_rss:.0f} MiB")
    print(f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
