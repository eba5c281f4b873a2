"""Readiness and health of a camserve container: camserve_tools.servers.model_probe under the image's name for it.

    python -m camserve_tools.container.probe [MODEL ...]      exit 0 ready, 1 not ready (the reason on stdout)

The image's HEALTHCHECK and the manifests' readiness commands run this; the liveness commands run model_probe
itself. Both are the same probe, a real prediction of every named model with its map, since a worker that cannot
load its handler leaves /ping healthy. Its settings come from the container's environment (model_probe's
docstring lists them): CAMSERVE_PROBE_MODELS, CAMSERVE_PROBE_PROTOCOL (plain, v1, v2), CAMSERVE_PROBE_URL, and the
key file in CAMSERVE_RUN_DIR, where the entry point has TorchServe write it.
"""

from __future__ import annotations

import sys

from camserve_tools.servers import model_probe


def main(argv: list[str] | None = None) -> int:
    return model_probe.main(argv, failure="not ready")


if __name__ == "__main__":
    sys.exit(main())
