"""Check every manifest under deploy/: Kubernetes kinds strictly against the API schemas, KServe's against its CRDs,
Ray Serve's config against Ray's schema, KubeRay's RayService as far as no KubeRay at hand allows.

    python -m camserve_tools.deploy.manifests deploy        # make check-manifests; tests/test_manifests.py runs the same

- Built-in kinds (Deployment, Service, HorizontalPodAutoscaler, ...) are validated by `kubernetes-validate` in
  strict mode (an unknown field is an error), against the oldest and the newest Kubernetes version we support.
- KServe's kinds (InferenceService, ServingRuntime, ClusterServingRuntime) are validated against the
  openAPIV3Schema of KServe's own CRDs (../shared/kserve-crds, KServe v0.20.0; CAMSERVE_KSERVE_CRDS names another
  folder) with jsonschema, strictly: every object schema that lists its properties and does not preserve unknown
  fields refuses any other key, as `kubectl apply --validate=strict` would. Without that folder the CRD check is
  skipped, and says so.
- An InferenceService is also walked against the kserve SDK's typed models (camserve_tools/deploy/kserve_models.py):
  any key a model does not declare, or a value of the wrong kind, is an error.
- A PrometheusRule (prometheus-operator's CRD, not shipped here) is checked against the fields of its rule groups;
  `promtool check rules` and `promtool test rules` run on its groups in tests/test_prometheus_rules.py.
- kustomization.yaml is kustomize's input, not a cluster object: only its keys are checked.
- A Ray Serve config (deploy/ray/serve-config.yaml: `applications`, no `kind`) and a RayService's serveConfigV2
  load into Ray's ServeDeploySchema; a key it does not read is an error too (Ray's models ignore unknown keys).
- A RayService (KubeRay) is checked against the field names of KubeRay v1.7.0's CRD, its rayStartParams as strings,
  each pod template strictly as a Kubernetes PodTemplateSpec; and strictly against KubeRay's CRD itself where
  ../shared/kuberay-crds (or CAMSERVE_KUBERAY_CRDS) holds it, skipped and said so otherwise.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from camserve_tools.deploy.kserve_models import check_kserve

# The oldest Kubernetes KServe 0.20 supports, and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
KSERVE_KINDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
}
# KServe's CRDs: ../shared/kserve-crds beside the repository, unless CAMSERVE_KSERVE_CRDS names another folder.
KSERVE_CRDS = Path(os.environ.get("CAMSERVE_KSERVE_CRDS", Path(__file__).resolve().parents[2].parent / "shared" / "kserve-crds"))
CRD_KINDS = {"InferenceService", "ServingRuntime", "ClusterServingRuntime"}
# KubeRay's CRDs (ray.io_rayservices.yaml): ../shared/kuberay-crds, unless CAMSERVE_KUBERAY_CRDS names another folder.
KUBERAY_CRDS = Path(os.environ.get("CAMSERVE_KUBERAY_CRDS", Path(__file__).resolve().parents[2].parent / "shared" / "kuberay-crds"))
KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "images", "namespace", "namePrefix", "nameSuffix", "labels", "commonLabels",
    "commonAnnotations", "patches", "configMapGenerator", "secretGenerator", "generatorOptions", "replicas", "components",
}  # fmt: skip
# prometheus-operator's PrometheusRule (monitoring.coreos.com/v1): the fields of its spec, strictly.
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"type": ["string", "integer"]},
        "for": {"type": "string"},
        "keep_firing_for": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "interval": {"type": "string"},
                            "query_offset": {"type": "string"},
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "rules": {"type": "array", "items": _RULE},
                        },
                    },
                }
            },
        },
    },
}


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
        # Item by item as far as both go: a schema that drops list items leaves lists of different lengths.
        pairs = enumerate(zip(given, read, strict=False))
        return [key for index, (g, r) in pairs for key in unread_keys(g, r, f"{path}[{index}]")]
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


def check_ray_service(document: dict, skipped: list[str] | None = None) -> list[str]:
    """A RayService: its own fields by name, each group's rayStartParams as strings, each pod template strictly as a
    Kubernetes PodTemplateSpec, serveConfigV2 as a Ray Serve config; and KubeRay's CRD where it is at hand."""
    problems = []
    try:
        problems += check_against_crd(document, KUBERAY_CRDS)
    except CrdsMissing:
        if skipped is not None:
            skipped.append(f"{KUBERAY_CRDS} is absent: the RayService checked by KubeRay's field names, not against its CRD")
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


def strict(schema: Any) -> Any:
    """`schema` with unknown fields refused: every object schema that lists properties, and neither preserves unknown
    fields nor sets additionalProperties itself, gets additionalProperties: false (recursively)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        result["additionalProperties"] = False
    return result


@functools.cache
def crd_validators(folder: Path) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a strict validator of that CRD version's openAPIV3Schema, for every CRD in `folder`."""
    validators = {}
    for path in sorted(folder.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


class CrdsMissing(Exception):
    """A folder of CRDs (KServe's, KubeRay's) is not there: the strict schema check cannot run."""


def check_against_crd(document: dict, folder: Path | None = None) -> list[str]:
    """Problems of a document against its CRD's schema in `folder` (KServe's by default; unknown fields included);
    CrdsMissing without CRDs."""
    folder = folder or KSERVE_CRDS
    if not folder.is_dir():
        raise CrdsMissing(f"{folder} is absent: KServe manifests not checked against KServe's CRDs")
    validator = crd_validators(folder).get((str(document.get("apiVersion")), str(document.get("kind"))))
    if validator is None:
        return [f"no CRD in {folder} defines {document.get('apiVersion')} {document.get('kind')}"]
    return [
        f"CRD schema: {'.'.join(str(part) for part in error.absolute_path) or '(root)'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda error: list(map(str, error.absolute_path)))
    ]


def check_document(document: dict, skipped: list[str] | None = None) -> list[str]:
    """Problems of one manifest; a check that cannot run here (no CRDs) is named in `skipped`."""
    key = (document.get("apiVersion"), document.get("kind"))
    problems: list[str] = []
    if key == RAY_SERVICE:
        return check_ray_service(document, skipped)
    if key == (None, None) and "applications" in document:
        return check_serve_config(document, "serve config")
    if document.get("kind") in CRD_KINDS and str(document.get("apiVersion", "")).startswith("serving.kserve.io/"):
        try:
            problems += check_against_crd(document)
        except CrdsMissing as missing:
            if skipped is not None:
                skipped.append(str(missing))
        if (model_name := KSERVE_KINDS.get((str(key[0]), str(key[1])))) is not None:
            problems += check_kserve(document, model_name)
        return problems
    if key == ("monitoring.coreos.com/v1", "PrometheusRule"):
        validator = jsonschema.Draft7Validator(PROMETHEUS_RULE_SCHEMA)
        return [f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}" for error in validator.iter_errors(document)]
    if document.get("kind") == "Kustomization":
        return [f"unknown kustomization key {name!r}" for name in sorted(set(document) - KUSTOMIZATION_KEYS)]
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            problems.append(f"Kubernetes {version}: {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"Kubernetes {version} has no schema for {key} (a CRD? add its check here)")
    return problems


def check_tree(root: Path, skipped: list[str] | None = None) -> dict[str, list[str]]:
    """Problems per `file#document`, for every YAML document under `root`; an empty dict when all pass. Checks that
    cannot run here go into `skipped` (once each)."""
    report: dict[str, list[str]] = {}
    files = sorted(root.rglob("*.yaml")) + sorted(root.rglob("*.yml"))
    if not files:
        report[str(root)] = ["no manifest found"]
    not_run: list[str] = []
    for path in files:
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is None:
                continue
            if not isinstance(document, dict):
                report[f"{path}#{index}"] = ["not a mapping"]
                continue
            if problems := check_document(document, not_run):
                report[f"{path}#{index}"] = problems
    if skipped is not None:
        skipped.extend(dict.fromkeys(not_run))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, nargs="?", default=Path("deploy"))
    args = parser.parse_args()
    skipped: list[str] = []
    report = check_tree(args.root, skipped)
    count = sum(1 for path in args.root.rglob("*.y*ml") for document in yaml.safe_load_all(path.read_text()) if document)
    for where, problems in report.items():
        for problem in problems:
            print(f"{where}: {problem}")
    for reason in skipped:
        print(f"SKIPPED: {reason}")
    if report:
        sys.exit(1)
    kserve = f"against KServe CRDs {KSERVE_CRDS} strict and kserve models" if KSERVE_CRDS.is_dir() else "against kserve models only"
    ray_service = f"against KubeRay's CRDs {KUBERAY_CRDS} strict" if KUBERAY_CRDS.is_dir() else "by KubeRay's field names"
    print(
        f"{count} manifests under {args.root}: valid (Kubernetes {', '.join(KUBERNETES_VERSIONS)} strict; KServe kinds {kserve}; "
        f"Ray Serve configs against Ray's schema; the RayService {ray_service})"
    )


if __name__ == "__main__":
    main()
