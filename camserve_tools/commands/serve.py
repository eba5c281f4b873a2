"""`camserve serve` / `camserve stop`: what `make serve` / `make stop` do.

`serve` starts an engine in the background with its own run dir (TMPDIR, logs, pid file) and returns once every
model answers a real prediction: TorchServe (`--engine torchserve`, the default), KServe's own model server
hosting the same pipeline (`--engine kserve`: no TorchServe, no Java), or Ray Serve hosting it on a local Ray
cluster of `--ray-nodes` nodes on loopback (`--engine ray`). `stop` stops exactly the server of that run dir,
whichever engine it is.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from camserve_tools.commands.common import EXIT_OK, CommandFailed, UsageError, add_command, add_output_arguments, emit, key_values
from camserve_tools.shared_fields import shared_fields


def register(subparsers: Any) -> None:
    from camserve_tools.servers.torchserve import add_server_arguments

    serve = add_command(
        subparsers,
        "serve",
        "start TorchServe in the background (make serve)",
        __doc__,
        "exit codes: 0 the server is up and every model answered a prediction; 1 it could not start "
        "(a model that cannot load, a port in use, a server of this run dir already running); 2 usage error",
    )
    add_server_arguments(serve)
    serve.add_argument("--engine", choices=ENGINES, default="torchserve", help="the serving engine (default: %(default)s)")
    serve.add_argument("--grpc-port", type=int, default=0, help="--engine kserve: its v2 gRPC port (default: off)")
    serve.add_argument("--ray-nodes", type=int, default=1, help="--engine ray: nodes of the local Ray cluster (default: %(default)s)")
    add_output_arguments(serve)
    serve.set_defaults(run=run_serve)
    stop = add_command(
        subparsers,
        "stop",
        "stop the server of a run dir (make stop)",
        __doc__,
        "exit codes: 0 stopped, or nothing was running; 2 usage error",
    )
    add_server_arguments(stop)
    add_output_arguments(stop)
    stop.set_defaults(run=run_stop)


ENGINES = ("torchserve", "kserve", "ray")
RUN_DIR_RECORDS = ("torchserve.pid", "kserve.pid", "ray-cluster.json")  # a server of the run dir runs while one is there


def run_serve(args: argparse.Namespace) -> int:
    from camserve_tools.servers.torchserve import AlreadyRunning, server_from_args, start_detached, usage_example

    if args.engine == "kserve":
        return _serve_on_kserve(args)
    if args.engine == "ray":
        return _serve_on_ray(args)
    server = server_from_args(args)
    _check_free(server.run_dir)
    if not args.quiet:
        print(f"starting TorchServe ({args.models}) in {server.run_dir} ...", file=sys.stderr)
    try:
        start_detached(server)
    except AlreadyRunning as error:
        raise CommandFailed(f"{error}; `camserve stop --run-dir {server.run_dir}` first") from None
    except (RuntimeError, TimeoutError, OSError) as error:
        raise CommandFailed(str(error)) from None
    report = {
        "inference": server.inference_url,
        "management": server.management_url,
        "metrics": server.metrics_url,
        "models": args.models,
        "run_dir": str(server.run_dir),
        "pid": server.process.pid,
    }
    emit(report, args.json, key_values(report) + "\nTry it:\n" + usage_example(server))
    return EXIT_OK


def _serve_on_kserve(args: argparse.Namespace) -> int:
    from camserve_tools.servers.kserve import KServeEngine
    from camserve_tools.servers.torchserve import usage_example

    run_dir = args.run_dir.resolve()
    archives = [args.model_store.resolve() / entry.split("=", 1)[-1] for entry in args.models.split(",") if entry]
    engine = KServeEngine(**shared_fields(args, KServeEngine, run_dir=run_dir, archives=archives, config=args.config.resolve()))
    _check_free(run_dir)
    if not args.quiet:
        print(f"starting KServe's model server ({args.models}) in {run_dir} ...", file=sys.stderr)
    try:
        engine.start()
    except (RuntimeError, TimeoutError, OSError) as error:
        raise CommandFailed(str(error)) from None
    report = {
        "engine": "kserve",
        "inference": engine.inference_url,
        "grpc_port": args.grpc_port or None,
        "models": args.models,
        "run_dir": str(run_dir),
        "pid": engine.process.pid,
    }
    emit(report, args.json, key_values(report) + "\nTry it:\n" + usage_example(engine))
    return EXIT_OK


def _serve_on_ray(args: argparse.Namespace) -> int:
    from camserve_tools.servers.ray_cluster import RayCluster, body_limit, parse_models
    from camserve_tools.servers.torchserve import usage_example

    if args.ray_nodes < 1:
        raise UsageError("--ray-nodes must be 1 or more")
    run_dir = args.run_dir.resolve()
    cluster = RayCluster(
        run_dir=run_dir,
        archives=parse_models(args.models, args.model_store.resolve()),
        nodes=args.ray_nodes,
        host=args.host,
        inference_port=args.inference_port,
        max_body_bytes=body_limit(args.config.resolve()),
    )
    _check_free(run_dir)
    if not args.quiet:
        print(f"starting a Ray cluster of {args.ray_nodes} node(s) serving {args.models} in {run_dir} ...", file=sys.stderr)
    try:
        cluster.start()
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as error:
        raise CommandFailed(str(error)) from None
    report = {
        "engine": "ray",
        "inference": cluster.inference_url,
        "ray_address": cluster.address,
        "nodes": args.ray_nodes,
        "models": args.models,
        "run_dir": str(run_dir),
    }
    emit(report, args.json, key_values(report) + "\nTry it:\n" + usage_example(cluster))
    return EXIT_OK


def _check_free(run_dir: Path) -> None:
    if any((run_dir / record).exists() for record in RUN_DIR_RECORDS):
        raise CommandFailed(f"a server of {run_dir} seems to run already (pid file present); `camserve stop --run-dir {run_dir}` first")


def run_stop(args: argparse.Namespace) -> int:
    from camserve_tools.servers.kserve import KServeEngine
    from camserve_tools.servers.ray_cluster import RayCluster
    from camserve_tools.servers.torchserve import server_from_args

    server = server_from_args(args)
    stopped = []
    if (server.run_dir / "torchserve.pid").exists():
        server.stop()
        stopped.append("TorchServe")
    engine = KServeEngine(run_dir=server.run_dir, archives=[])
    if engine.pid_file.exists():
        engine.stop()
        stopped.append("KServe model server")
    cluster = RayCluster(run_dir=server.run_dir, archives={})
    if cluster.record_file.exists():
        cluster.stop()
        stopped.append("Ray cluster")
    report = {"stopped": bool(stopped), "run_dir": str(server.run_dir)}
    emit(
        report,
        args.json,
        f"stopped the {' and '.join(stopped)} of {server.run_dir}" if stopped else f"no server of {server.run_dir} was running",
    )
    return EXIT_OK
