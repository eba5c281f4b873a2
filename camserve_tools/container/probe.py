"""Readiness and health of a camserve container: a real prediction of every named model, with its map.

    python -m camserve_tools.container.probe [MODEL ...]      exit 0 ready, 1 not ready (the reason on stdout)

Models: the arguments, else CAMSERVE_PROBE_MODELS (comma list), else `shapes`. A worker that cannot load its
handler leaves /ping healthy; this probe fails until the model answers. It sends the inference key from TorchServe's
key file when token authorization is on (TorchServe writes key_file.json into the entry point's run dir).
CAMSERVE_PROBE_PROTOCOL picks the request: `plain` (POST /predictions/{model}, the image as the body; default),
`v1` (POST /v1/models/{model}:predict, KServe v1 JSON) or `v2` (POST /v2/models/{model}/infer, a BYTES input), as
TorchServe answers them under its KServe envelopes.

Standard library only, and nothing imported from camserve: the probe runs every few seconds in a pod and must
start fast and work whatever else is broken.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request

URL = os.environ.get("CAMSERVE_PROBE_URL", "http://127.0.0.1:8080")
KEY_FILE = os.environ.get("CAMSERVE_KEY_FILE", os.path.join(os.environ.get("CAMSERVE_RUN_DIR", "/tmp/camserve"), "key_file.json"))
TIMEOUT = float(os.environ.get("CAMSERVE_PROBE_TIMEOUT", "4"))
# A 32x32 scene of the default model's generator: any image will do, the model resizes it.
IMAGE = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgBAMAAACBVGfHAAAAMFBMVEWcsXidpYKgm4ujkZKQzGKB2FSTwGyTtXGrgKSlh5uvbrOrdqq5U8u7R9W0XsKmXI"
    "/Em61JAAABIUlEQVR42l2RMUpDQRRFz/t/TAQL55UikjDWgmDjArKB7MDqgyBYZhGuQN2BS9AmoAiKRVyA8hGbNJmxixIzFvPnJ/iq4TLvzrl3ZABIFEszBiDS"
    "q4Fy7wuKpH84YPO6533hnAOW9X4fuDjEAA4glm7KHIzGkLai7szPcTLK9h6NAQSge9oF+O5G8cL6jEA0GQQAGxqwRo8CiAOfNySmG0peswGj2QBRrGD4Z1xUVeck"
    "G6uoymULcQWdH4zHNnBVLqgJpwELyB1MDiYrernR9vzLBAweSB2XHOUsMdGLBQMDFmNaXWY8TMvhVhiv/uW+7gw3zACA8UJm9e7Z0+t2aJ99gX5NcVutCQDHy2eg"
    "6GM0Bf98BFi+I28taOrDrKVQgD9aE1cex0PFYwAAAABJRU5ErkJggg=="
)


def request_for(model: str, protocol: str) -> tuple[str, bytes, str]:
    """(path, body, content type) of a prediction of IMAGE in `protocol`."""
    encoded = base64.b64encode(IMAGE).decode("ascii")
    if protocol == "v1":
        return f"/v1/models/{model}:predict", json.dumps({"instances": [{"data": encoded}]}).encode(), "application/json"
    if protocol == "v2":
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}
        return f"/v2/models/{model}/infer", json.dumps(body).encode(), "application/json"
    return f"/predictions/{model}", IMAGE, "application/octet-stream"


def has_map(answer: object) -> bool:
    """Whether `answer` holds, at any depth (envelopes nest it, v2 as a JSON string), our answer: predictions and a map."""
    if isinstance(answer, str) and answer.startswith("{"):
        try:
            answer = json.loads(answer)
        except ValueError:
            return False
    if isinstance(answer, dict):
        if answer.get("predictions") and isinstance(answer.get("cam"), dict):
            return True
        return any(has_map(value) for value in answer.values())
    if isinstance(answer, list):
        return any(has_map(item) for item in answer)
    return False


def probe(model: str) -> None:
    """Raises unless `model` answers a real prediction with predictions and a map."""
    path, body, content_type = request_for(model, os.environ.get("CAMSERVE_PROBE_PROTOCOL", "plain"))
    headers = {"Content-Type": content_type}
    if os.path.exists(KEY_FILE):
        with open(KEY_FILE) as keys:
            headers["Authorization"] = "Bearer " + json.load(keys)["inference"]["key"]
    request = urllib.request.Request(URL + path, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        answer = json.load(response)
    if not has_map(answer):
        raise ValueError("the answer has no predictions and map")


def main(argv: list[str] | None = None) -> int:
    models = (sys.argv[1:] if argv is None else argv) or [m for m in os.environ.get("CAMSERVE_PROBE_MODELS", "shapes").split(",") if m]
    failures = 0
    for model in models:
        try:
            probe(model)
        except Exception as error:  # noqa: BLE001 - any failure means not ready; say which
            print(f"not ready: {model}: {error}")
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
