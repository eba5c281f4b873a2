"""Python stubs for TorchServe's gRPC APIs, compiled from the protos its frontend jar ships (grpcio-tools).

    stubs = compile_stubs(Path(tmp))   # stubs.inference_pb2, stubs.inference_pb2_grpc, stubs.oip_pb2, stubs.oip_pb2_grpc

The jar is the version actually served, so the stubs always match it; nothing generated is kept in the repository.
`inference.proto` is TorchServe's own API (InferenceAPIsService: Predictions, input map name -> bytes);
`open_inference_grpc.proto` is the Open Inference Protocol (GRPCInferenceService: ModelInfer, ModelReady, ...),
served when ts_open_inference_protocol=true.
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import ts

JAR = Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"
PROTOS = ("inference.proto", "open_inference_grpc.proto")
# inference.proto imports google/rpc/status.proto, which neither protobuf nor grpcio-tools ship; the jar does.
DEPENDENCIES = ("google/rpc/status.proto",)


def compile_stubs(out_dir: Path) -> SimpleNamespace:
    """Extract the protos into `out_dir`, compile them there, and import the generated modules from it."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(JAR) as jar:
        for name in (*PROTOS, *DEPENDENCIES):
            target = out_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(jar.read(name))
    well_known = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    arguments = [
        "grpc_tools.protoc",
        f"-I{out_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
        *DEPENDENCIES,
    ]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTOS} from {JAR}")
    # The generated modules import each other by top-level name (inference_pb2 -> google.rpc.status_pb2).
    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))
    importlib.invalidate_caches()
    return SimpleNamespace(
        inference_pb2=importlib.import_module("inference_pb2"),
        inference_pb2_grpc=importlib.import_module("inference_pb2_grpc"),
        oip_pb2=importlib.import_module("open_inference_grpc_pb2"),
        oip_pb2_grpc=importlib.import_module("open_inference_grpc_pb2_grpc"),
    )
