"""`camserve serve` / `camserve stop`: what `make serve` / `make stop` do, through camserve_tools.server's own functions.

`serve` starts TorchServe in the background with its own run dir (TMPDIR, logs, pid file) and returns once every
model answers a real prediction; `stop` stops exactly the server of that run dir.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from camserve_tools.commands.common import EXIT_OK, CommandFailed, add_output_arguments, emit, key_values


def register(subparsers: Any) -> None:
    from camserve_tools.server import add_server_arguments

    serve = subparsers.add_parser(
        "serve",
        help="start TorchServe in the background (make serve)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 the server is up and every model answered a prediction; 1 it could not start "
        "(a model that cannot load, a port in use, a server of this run dir already running); 2 usage error",
    )
    add_server_arguments(serve)
    add_output_arguments(serve)
    serve.set_defaults(run=run_serve)
    stop = subparsers.add_parser(
        "stop",
        help="stop the server of a run dir (make stop)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 stopped, or nothing was running; 2 usage error",
    )
    add_server_arguments(stop)
    add_output_arguments(stop)
    stop.set_defaults(run=run_stop)


def run_serve(args: argparse.Namespace) -> int:
    from camserve_tools.server import AlreadyRunning, server_from_args, start_detached, usage_example

    server = server_from_args(args)
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


def run_stop(args: argparse.Namespace) -> int:
    from camserve_tools.server import server_from_args

    server = server_from_args(args)
    was_running = (server.run_dir / "torchserve.pid").exists()
    server.stop()
    report = {"stopped": was_running, "run_dir": str(server.run_dir)}
    emit(
        report,
        args.json,
        f"stopped the TorchServe of {server.run_dir}" if was_running else f"no TorchServe of {server.run_dir} was running",
    )
    return EXIT_OK
