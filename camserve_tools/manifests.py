"""Check every manifest under deploy/: Kubernetes kinds strictly against the API schemas, KServe's against its SDK,
Ray Serve's config against Ray's schema, KubeRay's RayService as far as no KubeRay at hand allows.

    python -m camserve_tools.manifests deploy        # make check-manifests; tests/test_manifests.py runs the same
    python -m camserve_tools.manifests deploy --crds ../shared/kuberay-crds   # and against CRDs' own schemas, strictly

- Built-in kinds (Deployment, Service, HorizontalPodAutoscaler, ...) are validated by `kubernetes-validate` in
  strict mode (an unknown field is an error), against the oldest and the newest Kubernetes version we support.
- CRDs are not in those schemas. An InferenceService is walked against the kserve SDK's typed models
  (V1beta1InferenceService and down, through their `attribute_map` / `openapi_types`, into the kubernetes
  client's models for pod fields): any key a model does not declare, or a value of the wrong kind, is an error.
  The document is built into those model objects as it is walked. (The SDK's own ApiClient.deserialize cannot:
  it looks every type up in kserve.models, which lacks the kubernetes client's V1ObjectMeta, V1EnvVar, ...)
- A Ray Serve config (deploy/ray/serve-config.yaml: `applications`, no `kind`) and a RayService's serveConfigV2
  load into Ray's ServeDeploySchema; a key it does not read is an error too (Ray's models ignore unknown keys).
- A RayService's pod templates are validated strictly as Kubernetes PodTemplateSpecs; its own fields against the
  field names of KubeRay v1.7.0's CRD (ray.io_rayservices.yaml), and with `--crds DIR` against that CRD's whole
  schema, any field it does not declare refused.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import kserve.models as kserve_models
import kubernetes.client.models as kubernetes_models
import kubernetes_validate
import yaml

# The oldest Kubernetes KServe 0.20 supports, and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
KSERVE_KINDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
}
# Types the kserve SDK names but does not define: what they stand for.
TYPE_ALIASES = {
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "V2HorizontalPodAutoscalerBehavior",
    "V1beta1MetricQuantity": "quantity",  # resource.Quantity: "50", 50, "1.5"
    "ResourceQuantity": "quantity",
}
SCALARS = {"str": str, "int": int, "float": (int, float), "bool": bool}


def model_class(name: str) -> type | None:
    return getattr(kserve_models, name, None) or getattr(kubernetes_models, name, None)


def load_typed(value: Any, type_name: str, path: str, problems: list[str]) -> Any:
    """`value` built into the openapi type `type_name` (a model class name, list[...], dict(str, ...)); each key no
    model declares, each value of the wrong kind and each model that refuses its arguments goes into `problems`."""
    type_name = TYPE_ALIASES.get(type_name, type_name)
    if value is None or type_name in ("object", "Any"):
        return value
    if type_name == "quantity":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            problems.append(f"{path}: a quantity, not {type(value).__name__}")
        return value
    if type_name in ("datetime", "date"):
        if not isinstance(value, str):
            problems.append(f"{path}: a date string")
        return value
    if type_name in SCALARS:
        if not isinstance(value, SCALARS[type_name]) or (isinstance(value, bool) and type_name != "bool"):
            problems.append(f"{path}: {type_name}, not {type(value).__name__} ({value!r})")
        return value
    # The two SDKs spell containers differently: kserve's list[X] / dict(str, X), the kubernetes client's List[X] / Dict[str, X].
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(value, list):
            problems.append(f"{path}: a list")
            return value
        return [load_typed(item, match.group(1), f"{path}[{index}]", problems) for index, item in enumerate(value)]
    if match := re.fullmatch(r"(?:dict\(|Dict\[)(\w+), (.+)[)\]]", type_name):
        if not isinstance(value, dict):
            problems.append(f"{path}: a mapping")
            return value
        return {key: load_typed(item, match.group(2), f"{path}.{key}", problems) for key, item in value.items()}
    cls = model_class(type_name)
    if cls is None:
        problems.append(f"{path}: the SDK names type {type_name!r} but defines no such model (add it to TYPE_ALIASES?)")
        return value
    if not isinstance(value, dict):
        problems.append(f"{path}: an object ({type_name}), not {type(value).__name__}")
        return value
    by_key = {key: attribute for attribute, key in cls.attribute_map.items()}
    arguments = {}
    for key, item in value.items():
        if key not in by_key:
            problems.append(f"{path}.{key}: unknown field of {type_name}")
            continue
        arguments[by_key[key]] = load_typed(item, cls.openapi_types[by_key[key]], f"{path}.{key}", problems)
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as error:  # a required field missing, a value out of its enum
        problems.append(f"{path}: {type_name} refuses it: {error}")
        return value


def check_kserve(document: dict, model_name: str) -> list[str]:
    """Problems of a KServe document; none means it loaded, whole, into the SDK's typed models."""
    problems: list[str] = []
    loaded = load_typed(document, model_name, document.get("kind", "?"), problems)
    if not problems and not isinstance(loaded, getattr(kserve_models, model_name)):
        problems.append(f"{document.get('kind')}: did not load into {model_name}")
    return problems


def check_serve_config(config: Any, where: str) -> list[str]:
    """Problems of a Ray Serve config (the `serve deploy` / `serve run` file, a RayService's serveConfigV2)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, dict):
        return [f"{where}: a Ray Serve config is a mapping"]
    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as error:
        return [f"{where}.{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()]
    return [f"{where}.{path}: Ray Serve's config has no such field" for path in unread_keys(config, schema.model_dump(exclude_unset=True))]


def unread_keys(given: Any, read: Any, path: str = "") -> list[str]:
    """Keys of `given` that a schema's dump of it (`read`) lacks: what the schema dropped without a word."""
    if isinstance(given, dict) and isinstance(read, dict):
        keys = []
        for key, value in given.items():
            where = f"{path}.{key}" if path else str(key)
            keys += [where] if key not in read else unread_keys(value, read[key], where)
        return keys
    if isinstance(given, list) and isinstance(read, list):
        return [key for index, (g, r) in enumerate(zip(given, read)) for key in unread_keys(g, r, f"{path}[{index}]")]
    return []


RAY_SERVICE = ("ray.io/v1", "RayService")
# The RayService's own fields, from KubeRay v1.7.0's CRD: (where, the fields it declares, those it requires).
RAY_SERVICE_FIELDS = (
    (
        "spec",
        {
            "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "managedBy", "rayClusterConfig",
            "rayClusterDeletionDelaySeconds", "serveConfigV2", "serveService", "serviceUnhealthySecondThreshold", "suspend",
            "upgradeStrategy",
        },
        {"rayClusterConfig"},
    ),
    (
        "spec.rayClusterConfig",
        {
            "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
            "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy", "rayVersion", "suspend",
            "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
        },
        {"headGroupSpec"},
    ),
    (
        "spec.rayClusterConfig.headGroupSpec",
        {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources", "serviceType", "template"},
        {"template"},
    ),
    (
        "spec.rayClusterConfig.workerGroupSpecs[]",
        {
            "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
            "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
        },
        {"groupName", "maxReplicas", "minReplicas", "template"},
    ),
)  # fmt: skip


def _at(document: dict, where: str) -> list[tuple[str, Any]]:
    """The values at a dotted path, `[]` standing for every item of a list: (their path, value)."""
    found: list[tuple[str, Any]] = [("", document)]
    for part in where.split("."):
        many = part.endswith("[]")
        name = part.removesuffix("[]")
        step = []
        for path, value in found:
            child = value.get(name) if isinstance(value, dict) else None
            path = f"{path}.{name}" if path else name
            if many and isinstance(child, list):
                step += [(f"{path}[{index}]", item) for index, item in enumerate(child)]
            elif child is not None and not many:
                step.append((path, child))
        found = step
    return found


def check_ray_service(document: dict) -> list[str]:
    """A RayService: its own fields by name, each group's rayStartParams as strings, each pod template strictly as a
    Kubernetes PodTemplateSpec, and serveConfigV2 as a Ray Serve config."""
    problems = []
    for where, known, required in RAY_SERVICE_FIELDS:
        for path, value in _at(document, where):
            if not isinstance(value, dict):
                problems.append(f"{path}: an object")
                continue
            problems += [f"{path}.{key}: unknown field of KubeRay's RayService" for key in sorted(set(value) - known)]
            problems += [f"{path}.{key}: required" for key in sorted(required - set(value))]
    for path, params in _at(document, "spec.rayClusterConfig.headGroupSpec.rayStartParams") + _at(
        document, "spec.rayClusterConfig.workerGroupSpecs[].rayStartParams"
    ):
        problems += [
            f"{path}.{key}: a string (KubeRay passes it to `ray start` as text)" for key, v in params.items() if not isinstance(v, str)
        ]
    templates = _at(document, "spec.rayClusterConfig.headGroupSpec.template") + _at(
        document, "spec.rayClusterConfig.workerGroupSpecs[].template"
    )
    for path, template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"}, "template": template}
        problems += [f"{path}: {problem}" for problem in check_document(pod_template)]
    serve_config = document.get("spec", {}).get("serveConfigV2")
    if not isinstance(serve_config, str):
        problems.append("spec.serveConfigV2: a YAML string holding the Serve config")
    else:
        problems += check_serve_config(yaml.safe_load(serve_config), "spec.serveConfigV2")
    return problems


def check_against_crds(document: dict, crd_dirs: list[Path]) -> list[str]:
    """`document` against the openAPIV3Schema of its kind's CRD in `crd_dirs` (none found: no problem), any field
    the schema does not declare refused, as a Kubernetes API server's strict field validation does."""
    import jsonschema

    group, _, version = str(document.get("apiVersion", "")).rpartition("/")
    for crd in (yaml.safe_load(path.read_text()) for directory in crd_dirs for path in sorted(directory.glob("*.yaml"))):
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        if crd["spec"]["group"] != group or crd["spec"]["names"]["kind"] != document.get("kind"):
            continue
        schema = next((v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version), None)
        if schema is None:
            return [f"{document.get('kind')}: its CRD serves no version {version!r}"]
        validator = jsonschema.Draft7Validator(_closed(schema))
        return [f"CRD {'.'.join(str(p) for p in error.absolute_path)}: {error.message[:300]}" for error in validator.iter_errors(document)]
    return []


def _closed(schema: Any) -> Any:
    """An openAPI schema where every object with declared properties refuses any other (unless it keeps unknown fields)."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        closed["additionalProperties"] = False
    return closed


def check_document(document: dict) -> list[str]:
    key = (document.get("apiVersion"), document.get("kind"))
    if key in KSERVE_KINDS:
        return check_kserve(document, KSERVE_KINDS[key])
    if key == RAY_SERVICE:
        return check_ray_service(document)
    if key == (None, None) and "applications" in document:
        return check_serve_config(document, "serve config")
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            problems.append(f"Kubernetes {version}: {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"Kubernetes {version} has no schema for {key} (a CRD? add its check here)")
    return problems


def check_tree(root: Path, crd_dirs: list[Path] | None = None) -> dict[str, list[str]]:
    """Problems per `file#document`, for every YAML document under `root` (and against the CRDs in `crd_dirs`);
    an empty dict when all pass."""
    report: dict[str, list[str]] = {}
    files = sorted(root.rglob("*.yaml")) + sorted(root.rglob("*.yml"))
    if not files:
        report[str(root)] = ["no manifest found"]
    for path in files:
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is None:
                continue
            if not isinstance(document, dict):
                report[f"{path}#{index}"] = ["not a mapping"]
                continue
            if problems := check_document(document) + check_against_crds(document, crd_dirs or []):
                report[f"{path}#{index}"] = problems
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, nargs="?", default=Path("deploy"))
    parser.add_argument("--crds", type=Path, action="append", default=[], help="a folder of CRDs to validate custom resources against")
    args = parser.parse_args()
    report = check_tree(args.root, args.crds)
    count = sum(1 for path in args.root.rglob("*.y*ml") for document in yaml.safe_load_all(path.read_text()) if document)
    for where, problems in report.items():
        for problem in problems:
            print(f"{where}: {problem}")
    if report:
        sys.exit(1)
    print(
        f"{count} manifests under {args.root}: valid (Kubernetes {', '.join(KUBERNETES_VERSIONS)} strict; InferenceService "
        f"against kserve's models; Ray Serve configs against Ray's schema; RayService by KubeRay's fields"
        f"{', and against the CRDs in ' + ', '.join(map(str, args.crds)) if args.crds else ''})"
    )


if __name__ == "__main__":
    main()
