"""The Ray Serve application a local cluster deploys: deploy/ray/serve-config.yaml made this run's.

Kept apart from the cluster's processes (camserve_tools/servers/ray_cluster.py): building the config needs no
cluster, and the tests check it without starting one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from camserve_tools.servers.torchserve import ROOT

SERVE_CONFIG = ROOT / "deploy" / "ray" / "serve-config.yaml"


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override`'s keys, nested dicts merged key by key."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) else value
    return result


def parse_models(models: str, model_store: Path) -> dict[str, Path]:
    """TorchServe's `name=archive.mar,...` -> {name: path}, archives relative to `model_store`."""
    pairs = [entry.split("=", 1) if "=" in entry else [Path(entry).stem, entry] for entry in models.split(",") if entry]
    return {name: (model_store / archive).resolve() for name, archive in pairs}


@dataclass
class ApplicationSettings:
    """What of a run goes into the application: where it listens, what it serves, how many nodes carry it."""

    host: str
    port: int
    archives: dict[str, Path]
    nodes: int
    max_body_bytes: int
    # Per deployment (model name or CamRouter): options merged over serve-config.yaml's (autoscaling, user_config, ...)
    deployment_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def deployment(self, deployment: dict[str, Any]) -> dict[str, Any]:
        """`deployment` with this run's options for it; a fixed num_replicas replaces autoscaling."""
        options = self.deployment_options.get(deployment["name"], {})
        result = merged(deployment, options)
        if "num_replicas" in options:
            result.pop("autoscaling_config", None)
        return result

    def model_app(self, template: dict[str, Any], name: str, source: Path) -> dict[str, Any]:
        """The application of one model, from its template: its route, its archive, at least one replica per node."""
        app = copy.deepcopy(template)
        source = Path(source).resolve()
        app.update(name=name, route_prefix=f"/predictions/{name}")
        app["args"].update(name=name, model_store=str(source.parent), source=source.name, max_body_bytes=self.max_body_bytes)
        (deployment,) = app["deployments"]
        deployment["name"] = name
        scaling = deployment.get("autoscaling_config")
        if scaling is not None:
            scaling["min_replicas"] = max(scaling.get("min_replicas", 1), self.nodes)
            scaling["max_replicas"] = max(scaling.get("max_replicas", 1), scaling["min_replicas"])
        app["deployments"] = [self.deployment(deployment)]
        return app


def application_config(serve_config: Path, settings: ApplicationSettings) -> dict[str, Any]:
    """serve-config.yaml for this run: its port and host, the run's models and body limit, and at least one
    replica per node for every model, so that losing a node never leaves a model without one."""
    config = yaml.safe_load(serve_config.read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {**config.get("http_options", {}), "host": settings.host, "port": settings.port}
    templates = {app["name"]: app for app in config["applications"]}
    router = next(app for app in config["applications"] if app["import_path"].endswith(":router_app"))
    model_template = next(app for app in config["applications"] if app["import_path"].endswith(":model_app"))
    router["args"].update(models=list(settings.archives), max_body_bytes=settings.max_body_bytes)
    router["deployments"] = [settings.deployment(deployment) for deployment in router.get("deployments", [])]
    models = [settings.model_app(templates.get(name, model_template), name, source) for name, source in settings.archives.items()]
    config["applications"] = [router, *models]
    return config
