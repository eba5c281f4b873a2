"""Ray's command lines (`ray`, `serve`) and driver connections that keep a loopback address loopback.

    python -m camserve_tools.servers.ray_loopback ray start --head --node-ip-address=127.0.0.1 ...
    python -m camserve_tools.servers.ray_loopback serve run --address 127.0.0.1:<port> --non-blocking config.yaml

Ray's CLI and `ray.init` turn `127.0.0.1` (as a node address or in `--address`) into the machine's routable address,
so that other machines could join; a node whose address is routable then listens on every interface (GCS, raylet,
workers, agents, the client server). Ray listens on loopback alone when a node's address is loopback, which is what
Ray itself does where it supports no multi-node clusters (macOS, Windows). Here that resolution keeps loopback, so
a cluster of several nodes on one machine stays on 127.0.0.1; any other address resolves as Ray resolves it.
"""

from __future__ import annotations

import logging
import sys


def keep_loopback() -> None:
    """Ray's resolution of a node address, except that a loopback address stays what it is."""
    from ray._common.network_utils import is_localhost
    from ray._private import services

    resolve = services.resolve_ip_for_localhost
    if getattr(resolve, "keeps_loopback", False):
        return

    def resolve_keeping_loopback(host: str) -> str:
        return host if host and is_localhost(host) else resolve(host)

    resolve_keeping_loopback.keeps_loopback = True  # type: ignore[attr-defined]
    services.resolve_ip_for_localhost = resolve_keeping_loopback


def connect(address: str) -> None:
    """This process as a Ray driver of the cluster at `address` (127.0.0.1:<port>), quietly."""
    import ray

    keep_loopback()
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("ray", "serve"):
        sys.exit("usage: python -m camserve_tools.servers.ray_loopback ray|serve ARGS...")
    keep_loopback()
    sys.argv = args
    if args[0] == "ray":
        from ray.scripts.scripts import main as ray_main

        ray_main()
    else:
        from ray.serve.scripts import cli

        cli()


if __name__ == "__main__":
    main()
