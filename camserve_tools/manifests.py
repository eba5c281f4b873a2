"""Check every manifest under deploy/: Kubernetes kinds strictly against the API schemas, KServe's against its SDK.

    python -m camserve_tools.manifests deploy        # make check-manifests; tests/test_manifests.py runs the same

- Built-in kinds (Deployment, Service, HorizontalPodAutoscaler, ...) are validated by `kubernetes-validate` in
  strict mode (an unknown field is an error), against the oldest and the newest Kubernetes version we support.
- CRDs are not in those schemas. An InferenceService is walked against the kserve SDK's typed models
  (V1beta1InferenceService and down, through their `attribute_map` / `openapi_types`, into the kubernetes
  client's models for pod fields): any key a model does not declare, or a value of the wrong kind, is an error.
  The document is built into those model objects as it is walked. (The SDK's own ApiClient.deserialize cannot:
  it looks every type up in kserve.models, which lacks the kubernetes client's V1ObjectMeta, V1EnvVar, ...)
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


def check_document(document: dict) -> list[str]:
    key = (document.get("apiVersion"), document.get("kind"))
    if key in KSERVE_KINDS:
        return check_kserve(document, KSERVE_KINDS[key])
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


def check_tree(root: Path) -> dict[str, list[str]]:
    """Problems per `file#document`, for every YAML document under `root`; an empty dict when all pass."""
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
            if problems := check_document(document):
                report[f"{path}#{index}"] = problems
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, nargs="?", default=Path("deploy"))
    args = parser.parse_args()
    report = check_tree(args.root)
    count = sum(1 for path in args.root.rglob("*.y*ml") for document in yaml.safe_load_all(path.read_text()) if document)
    for where, problems in report.items():
        for problem in problems:
            print(f"{where}: {problem}")
    if report:
        sys.exit(1)
    print(
        f"{count} manifests under {args.root}: valid (Kubernetes {', '.join(KUBERNETES_VERSIONS)} strict; InferenceService "
        f"against kserve's models)"
    )


if __name__ == "__main__":
    main()
