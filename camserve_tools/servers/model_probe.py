"""Does each model really answer? One real prediction per model, within a timeout: the pods' liveness and readiness.

    python model_probe.py [--url http://127.0.0.1:8080] [--timeout 4] [--envelope kserve|kservev2]
                          [--protocol plain|v1|v2] [MODEL ...]

Exit 0 when every model named answered a prediction with its map in time, 1 otherwise (one line per failure).

Why a real answer: TorchServe's health answers do not prove that a model can serve. A worker that cannot load its
handler leaves /ping healthy; and a TorchServe 0.12 frontend bug (a gRPC StreamPredictions2 call arriving while
the worker is busy) drops the worker for good while the management API still lists it READY and /ping still says
Healthy, so that every later request waits forever. Only an answer tells the difference, and only a restart of
the container recovers from the second case: the liveness probe of deploy/kubernetes and deploy/kserve runs this
with a long timeout, the readiness probe (camserve_tools.container.probe, the image's HEALTHCHECK) with a short one.

Standard library only, and Python 3.9 compatible (annotations are never evaluated): it runs inside TorchServe's
own images, where `make kserve-bundle` writes a copy of this file into the bundle's config/ directory.
camserve_tools.kserve.front uses its request and check in-process.

Settings (an option wins over its variable):
    MODEL ...    CAMSERVE_PROBE_MODELS    the models to ask (a comma list; default shapes)
    --url        CAMSERVE_PROBE_URL       TorchServe's inference address (default http://127.0.0.1:8080)
    --timeout    CAMSERVE_PROBE_TIMEOUT   seconds per model (default 4)
    --key-file   CAMSERVE_KEY_FILE        TorchServe's key_file.json, its inference key sent when the file exists
                                          (default: key_file.json in CAMSERVE_RUN_DIR, the camserve image's run dir,
                                          else TorchServe's images' /home/model-server/key_file.json)
    --envelope   TS_SERVICE_ENVELOPE      the KServe envelope TorchServe applies to /predictions (the runtime sets it)
    --protocol   CAMSERVE_PROBE_PROTOCOL  the route: plain (POST /predictions/{model}), v1 (/v1/models/{model}:predict)
                                          or v2 (/v2/models/{model}/infer); v1 and v2 carry their own envelope
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
# KServe's routes, each with the envelope its body and answer are in.
PROTOCOL_ENVELOPES = {"v1": "kserve", "v2": "kservev2"}
PROTOCOLS = ("plain", *PROTOCOL_ENVELOPES)
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_KEY_FILE = "/home/model-server/key_file.json"


def probe_request(envelope: str, image: bytes = IMAGE) -> tuple[bytes, dict[str, str]]:
    """A prediction of `image`: its body and content type, in the protocol TorchServe speaks under `envelope`."""
    encoded = base64.b64encode(image).decode("ascii")
    if envelope == "kserve":
        body: dict[str, Any] = {"instances": [{"data": encoded}]}
    elif envelope == "kservev2":
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}
    else:
        return image, {"Content-Type": "application/octet-stream"}
    return json.dumps(body).encode("ascii"), {"Content-Type": "application/json"}


def envelope_of(protocol: str, envelope: str = "") -> str:
    """The envelope a request of `protocol` is in: KServe's routes have their own, plain routes TorchServe's."""
    return PROTOCOL_ENVELOPES.get(protocol, envelope)


def request_for(model: str, protocol: str, envelope: str = "") -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of a prediction of IMAGE by `model` on the route of `protocol`."""
    body, headers = probe_request(envelope_of(protocol, envelope))
    if protocol == "v1":
        return f"/v1/models/{model}:predict", body, headers
    if protocol == "v2":
        return f"/v2/models/{model}/infer", body, headers
    return f"/predictions/{model}", body, headers


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


def default_key_file() -> str:
    """CAMSERVE_KEY_FILE, else the key file in the camserve image's run dir, else the one of TorchServe's images."""
    run_dir = os.environ.get("CAMSERVE_RUN_DIR")
    return os.environ.get("CAMSERVE_KEY_FILE") or (os.path.join(run_dir, "key_file.json") if run_dir else DEFAULT_KEY_FILE)


def probe(url: str, model: str, timeout: float, envelope: str, key_file: str, protocol: str = "plain") -> None:
    """Raise unless `model` answers a prediction with its map within `timeout` seconds."""
    path, body, headers = request_for(model, protocol, envelope)
    key = inference_key(key_file)
    if key:
        headers["Authorization"] = "Bearer " + key
    request = urllib.request.Request(url.rstrip("/") + path, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.load(response)
    problem = answer_problem(envelope_of(protocol, envelope), answer)
    if problem:
        raise ValueError(problem)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model names (default: CAMSERVE_PROBE_MODELS, else shapes)")
    parser.add_argument("--url", default=os.environ.get("CAMSERVE_PROBE_URL", DEFAULT_URL))
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("CAMSERVE_PROBE_TIMEOUT", "4")))
    parser.add_argument("--key-file", default=default_key_file())
    parser.add_argument("--envelope", choices=ENVELOPES, default=os.environ.get("TS_SERVICE_ENVELOPE", ""))
    parser.add_argument("--protocol", choices=PROTOCOLS, default=os.environ.get("CAMSERVE_PROBE_PROTOCOL", "plain"))
    args = parser.parse_args(argv)
    args.models = args.models or [m for m in os.environ.get("CAMSERVE_PROBE_MODELS", "shapes").split(",") if m]
    return args


def main(argv: list[str] | None = None, failure: str = "not answering") -> int:
    """Probe every model named; `failure` starts the line of each that did not answer."""
    args = parse_args(argv)
    failures = 0
    for model in args.models:
        try:
            probe(args.url, model, args.timeout, args.envelope, args.key_file, args.protocol)
        except Exception as error:  # noqa: BLE001 - any failure means no answer; say which
            print(f"{failure}: {model}: {type(error).__name__}: {str(error)[:200]}")
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
