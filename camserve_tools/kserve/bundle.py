"""The storage tree KServe's TorchServe runtime (kserve-torchserve) reads: config/config.properties + model-store/*.mar,
and config/model_probe.py for the InferenceServices' liveness probe.

    python -m camserve_tools.kserve.bundle --out .run/kserve-bundle [--config config/production.properties]
        [--protocol v1|v2] model_store/shapes.mar [more.mar ...]

Copy the printed directory to a bucket or a volume and point the InferenceService's storageUri at it
(deploy/kserve/, docs/deploy.md). In the pod, KServe's own model server owns 8080; TorchServe answers on
127.0.0.1:8085 behind it, and only the Prometheus metrics (8082) listen beyond the pod's loopback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from camserve.protocol.limits import TORCHSERVE_MAX_REQUEST_SIZE
from camserve_tools.servers import model_probe

ROOT = Path(__file__).resolve().parents[2]

# The pod's layout, fixed by the runtime (ClusterServingRuntime kserve-torchserve and its image's kserve_wrapper).
MOUNT = "/mnt/models"
INFERENCE_PORT = 8085  # KServe's model server takes 8080; the wrapper forwards to TorchServe here
METRICS_PORT = 8082  # the runtime's prometheus.kserve.io/port annotation
# Not 8081: the wrapper's ModelServer opens its gRPC server there. Not 8085 either: on a shared connector
# TorchServe checks the inference token and then the management token, so with tokens on no request passes both.
MANAGEMENT_PORT = 8086
GRPC_INFERENCE_PORT = 7070  # what the wrapper's grpc-v2 mode dials (it reads grpc_inference_port from this file)
GRPC_MANAGEMENT_PORT = 7071
FRONT_GRPC_PORT = 8081  # KServe's own gRPC server (the wrapper's ModelServer), in the runtime's grpc-v2 mode
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}
PROBE_NAME = "model_probe.py"  # config/model_probe.py: does each model really answer (camserve_tools.servers.model_probe)

# Written by this module whatever the base config says: addresses, store, snapshot, envelope.
OWNED_KEYS = {
    "inference_address",
    "management_address",
    "metrics_address",
    "grpc_inference_address",
    "grpc_management_address",
    "grpc_inference_port",
    "grpc_management_port",
    "model_store",
    "load_models",
    "model_snapshot",
    "service_envelope",
    "enable_envvars_config",
    "disable_token_authorization",
    "metrics_mode",
    "vmargs",
    "allowed_urls",
    "ts_open_inference_protocol",
}
# model-config.yaml keys -> model_snapshot keys (TorchServe takes a snapshot's values over the archive's).
SNAPSHOT_SETTINGS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 100, "responseTimeout": 120}


@dataclass
class ArchiveInfo:
    path: Path
    name: str
    version: str
    settings: dict[str, int]


def read_archive(path: Path) -> ArchiveInfo:
    """Name, version and worker settings of a .mar, from its MANIFEST.json and the model-config.yaml it carries."""
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        model = manifest.get("model", {})
        config_name = model.get("configFile")
        config = yaml.safe_load(archive.read(config_name)) if config_name else {}
    config = config or {}
    settings = {key: int(config.get(key, default)) for key, default in SNAPSHOT_SETTINGS.items()}
    return ArchiveInfo(
        path=path, name=model.get("modelName") or path.stem, version=str(model.get("modelVersion") or "1.0"), settings=settings
    )


def model_snapshot(archives: list[ArchiveInfo]) -> dict:
    """TorchServe's snapshot format: how the runtime (started with no --models) learns which archives to load."""
    models = {info.name: {info.version: {"defaultVersion": True, "marName": f"{info.name}.mar", **info.settings}} for info in archives}
    return {"name": "startup.cfg", "modelCount": len(models), "models": models}


def read_properties(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "!")) and "=" in stripped:
            key, value = stripped.split("=", 1)
            pairs.append((key.strip(), value.strip()))
    return pairs


def body_limit(config: Path) -> int:
    """A TorchServe config's max_request_size (TorchServe's default when unset): every engine bounds the body by it."""
    return int(dict(read_properties(config)).get("max_request_size", TORCHSERVE_MAX_REQUEST_SIZE))


def config_properties(base_config: Path, archives: list[ArchiveInfo], protocol: str) -> str:
    carried = [(key, value) for key, value in read_properties(base_config) if key not in OWNED_KEYS]
    lines = [
        f"# Written by `make kserve-bundle` (camserve_tools/kserve/bundle.py) from {base_config.name}, protocol {protocol}.",
        "# KServe's model server owns 8080 in the pod and forwards to TorchServe on loopback 8085. Only the Prometheus",
        "# metrics listen on the pod's address (the runtime's prometheus.kserve.io/port: 8082): cluster-internal, never",
        "# on a public Service. Management (8086) and gRPC (7070/7071) stay on loopback, for the wrapper alone.",
        f"inference_address=http://127.0.0.1:{INFERENCE_PORT}",
        f"management_address=http://127.0.0.1:{MANAGEMENT_PORT}",
        f"metrics_address=http://0.0.0.0:{METRICS_PORT}",
        "grpc_inference_address=127.0.0.1",
        "grpc_management_address=127.0.0.1",
        f"grpc_inference_port={GRPC_INFERENCE_PORT}",
        f"grpc_management_port={GRPC_MANAGEMENT_PORT}",
        "metrics_mode=prometheus",
        f"model_store={MOUNT}/model-store",
        "# Only archives of a model store may be registered (the model API is off too).",
        "allowed_urls=file://.*/model-store/[^/]*\\\\.mar",
        "# The runtime sets TS_SERVICE_ENVELOPE from the InferenceService's protocolVersion (kserve / kservev2). camserve's",
        "# handler answers that envelope itself; TorchServe must not unwrap it first, so it reads no TS_* variable.",
        "enable_envvars_config=false",
        "# TorchServe's keys regenerate per process and expire: inside the pod, KServe's own front guards the model.",
        "disable_token_authorization=true",
    ]
    if protocol == "v2":
        lines += [
            "# Open Inference Protocol: /v2/health/* over HTTP and GRPCInferenceService on the gRPC inference port.",
            "ts_open_inference_protocol=true",
        ]
    lines += [
        "# The JVM sizes its heap from the container's memory limit, leaving the rest to the Python workers.",
        "vmargs=-XX:+UseContainerSupport -XX:MaxRAMPercentage=25.0 -XX:+ExitOnOutOfMemoryError",
        f"# Carried from {base_config.name}:",
        *(f"{key}={value}" for key, value in carried),
        "# Which archives to load, with each one's workers, batch size, delay and timeout from its model-config.yaml.",
        f"model_snapshot={json.dumps(model_snapshot(archives), separators=(',', ':'))}",
    ]
    return "\n".join(lines) + "\n"


def write_bundle(out: Path, archives: list[Path], base_config: Path, protocol: str = "v1") -> Path:
    """Write `out/config/config.properties`, `out/config/model_probe.py` and `out/model-store/<name>.mar`; returns `out`."""
    if protocol not in ENVELOPES:
        raise ValueError(f"protocol must be one of {sorted(ENVELOPES)}, not {protocol!r}")
    if not archives:
        raise ValueError("no archive given")
    infos = [read_archive(path) for path in archives]
    names = [info.name for info in infos]
    if len(set(names)) != len(names):
        raise ValueError(f"two archives carry the same model name: {names}")
    shutil.rmtree(out / "model-store", ignore_errors=True)
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True)
    for info in infos:
        shutil.copy2(info.path, out / "model-store" / f"{info.name}.mar")
    (out / "config" / "config.properties").write_text(config_properties(base_config, infos, protocol))
    # The InferenceServices' liveness probe runs it from the mounted bundle (deploy/kserve/).
    shutil.copyfile(model_probe.__file__, out / "config" / PROBE_NAME)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archives", nargs="+", type=Path, help=".mar files (a comma list works too)")
    parser.add_argument("--out", type=Path, default=ROOT / ".run" / "kserve-bundle")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "production.properties", help="TorchServe settings to carry over")
    parser.add_argument("--protocol", choices=sorted(ENVELOPES), default="v1")
    args = parser.parse_args()
    archives = [Path(part) for entry in args.archives for part in str(entry).split(",") if part]
    out = write_bundle(args.out.resolve(), archives, args.config, args.protocol)
    print(out)


if __name__ == "__main__":
    main()
