"""Does each model really answer? One real prediction per model, within a timeout: the pods' liveness and readiness.

    python model_probe.py [--url http://127.0.0.1:8080] [--timeout 4] [--envelope kserve|kservev2] [MODEL ...]

Exit 0 when every model named answered a prediction with its map in time, 1 otherwise (one line per failure).

Why a real answer: TorchServe's health answers do not prove that a model can serve. A worker that cannot load its
handler leaves /ping healthy; and a TorchServe 0.12 frontend bug (a gRPC StreamPredictions2 call arriving while
the worker is busy) drops the worker for good while the management API still lists it READY and /ping still says
Healthy, so that every later request waits forever. Only an answer tells the difference, and only a restart of
the container recovers from the second case: the liveness probe of deploy/kubernetes and deploy/kserve runs this
with a long timeout, the readiness probe with a short one.

Standard library only, and Python 3.9 compatible (annotations are never evaluated): it runs inside TorchServe's
own images. deploy/kubernetes/
configmap.yaml carries a copy (tests/test_hostile_grpc.py checks that it is this file), and `make kserve-bundle`
writes one into the bundle's config/ directory. camserve_tools.kserve.front uses its request and check in-process.

Settings (an option wins over its variable):
    --url        CAMSERVE_PROBE_URL       TorchServe's inference address (default http://127.0.0.1:8080)
    --timeout    CAMSERVE_PROBE_TIMEOUT   seconds per model (default 4)
    --key-file   CAMSERVE_KEY_FILE        TorchServe's key_file.json: its inference key is sent when the file exists
    --envelope   TS_SERVICE_ENVELOPE      the KServe envelope TorchServe applies (the runtime sets this variable)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.request
from typing import Any

# A 32x32 scene of the default model's generator: any image will do, every archive resizes it to its input.
IMAGE = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgBAMAAACBVGfHAAAAMFBMVEWcsXidpYKgm4ujkZKQzGKB2FSTwGyTtXGrgKSlh5uvbrOrdqq5U8u7R9W0XsKm"
    "XI/Em61JAAABIUlEQVR42l2RMUpDQRRFz/t/TAQL55UikjDWgmDjArKB7MDqgyBYZhGuQN2BS9AmoAiKRVyA8hGbNJmxixIzFvPnJ/iq4TLvzrl3ZABI"
    "FEszBiDSq4Fy7wuKpH84YPO6533hnAOW9X4fuDjEAA4glm7KHIzGkLai7szPcTLK9h6NAQSge9oF+O5G8cL6jEA0GQQAGxqwRo8CiAOfNySmG0peswGj"
    "2QBRrGD4Z1xUVeckG6uoymULcQWdH4zHNnBVLqgJpwELyB1MDiYrernR9vzLBAweSB2XHOUsMdGLBQMDFmNaXWY8TMvhVhiv/uW+7gw3zACA8UJm9e7Z"
    "0+t2aJ99gX5NcVutCQDHy2eg6GM0Bf98BFi+I28taOrDrKVQgD9aE1cex0PFYwAAAABJRU5ErkJggg=="
)
ENVELOPES = ("", "body", "json", "kserve", "kservev2")
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_KEY_FILE = "/home/model-server/key_file.json"


def probe_request(envelope: str) -> tuple[bytes, dict[str, str]]:
    """The probe's body and content type, in the protocol TorchServe speaks under `envelope`."""
    encoded = base64.b64encode(IMAGE).decode("ascii")
    if envelope == "kserve":
        body: dict[str, Any] = {"instances": [{"data": encoded}]}
    elif envelope == "kservev2":
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}
    else:
        return IMAGE, {"Content-Type": "application/octet-stream"}
    return json.dumps(body).encode("ascii"), {"Content-Type": "application/json"}


def answer_problem(envelope: str, answer: Any) -> str | None:
    """None when `answer` (the decoded JSON body) holds predictions and a map, else what is wrong with it."""
    if envelope == "kserve" and isinstance(answer, dict):
        answer = (answer.get("predictions") or [None])[0]
    elif envelope == "kservev2" and isinstance(answer, dict):
        outputs = answer.get("outputs") or [{}]
        answer = ((outputs[0] if isinstance(outputs[0], dict) else {}).get("data") or [None])[0]
        if isinstance(answer, str):
            try:
                answer = json.loads(answer)
            except ValueError:
                return "the v2 output is not our JSON answer"
    if isinstance(answer, dict) and answer.get("predictions") and isinstance(answer.get("cam"), dict):
        return None
    return "the answer has no predictions and map"


def inference_key(key_file: str) -> str | None:
    if not os.path.exists(key_file):
        return None
    with open(key_file) as keys:
        return str(json.load(keys)["inference"]["key"])


def probe(url: str, model: str, timeout: float, envelope: str, key_file: str) -> None:
    """Raise unless `model` answers a prediction with its map within `timeout` seconds."""
    body, headers = probe_request(envelope)
    key = inference_key(key_file)
    if key:
        headers["Authorization"] = "Bearer " + key
    request = urllib.request.Request(url.rstrip("/") + "/predictions/" + model, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.load(response)
    problem = answer_problem(envelope, answer)
    if problem:
        raise ValueError(problem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["shapes"], help="model names (default: shapes)")
    parser.add_argument("--url", default=os.environ.get("CAMSERVE_PROBE_URL", DEFAULT_URL))
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("CAMSERVE_PROBE_TIMEOUT", "4")))
    parser.add_argument("--key-file", default=os.environ.get("CAMSERVE_KEY_FILE", DEFAULT_KEY_FILE))
    parser.add_argument("--envelope", choices=ENVELOPES, default=os.environ.get("TS_SERVICE_ENVELOPE", ""))
    args = parser.parse_args(argv)
    failures = 0
    for model in args.models:
        try:
            probe(args.url, model, args.timeout, args.envelope, args.key_file)
        except Exception as error:  # noqa: BLE001 - any failure means no answer; say which
            print(f"not answering: {model}: {type(error).__name__}: {str(error)[:200]}")
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
