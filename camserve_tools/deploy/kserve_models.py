"""An InferenceService (or ClusterServingRuntime) walked against the kserve SDK's typed models: V1beta1InferenceService
and down, through their `attribute_map` / `openapi_types`, into the kubernetes client's models for pod fields. Any
key a model does not declare, or a value of the wrong kind, is a problem. (The SDK's own ApiClient.deserialize
cannot do this: it looks every type up in kserve.models, which lacks the kubernetes client's V1ObjectMeta,
V1EnvVar, ...)
"""

from __future__ import annotations

import re
from typing import Any

import kserve.models as kserve_models
import kubernetes.client.models as kubernetes_models

# Types the kserve SDK names but does not define: what they stand for.
TYPE_ALIASES = {
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "V2HorizontalPodAutoscalerBehavior",
    "V1beta1MetricQuantity": "quantity",  # resource.Quantity: "50", 50, "1.5"
    "ResourceQuantity": "quantity",
}
SCALARS: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float), "bool": bool}
# The two SDKs spell containers differently: kserve's list[X] / dict(str, X), the kubernetes client's List[X] / Dict[str, X].
LIST_TYPE = re.compile(r"[lL]ist\[(.+)\]")
DICT_TYPE = re.compile(r"(?:dict\(|Dict\[)(\w+), (.+)[)\]]")


def model_class(name: str) -> Any:
    """The SDK model class `name` (kserve's first, then the kubernetes client's), or None. Typed Any: the
    generated classes declare `attribute_map` and `openapi_types` only as class attributes of each model."""
    return getattr(kserve_models, name, None) or getattr(kubernetes_models, name, None)


def scalar_problem(value: Any, type_name: str, path: str) -> str | None:
    """What is wrong with a quantity, date or scalar `value` of openapi type `type_name`, or None."""
    if type_name == "quantity":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            return f"{path}: a quantity, not {type(value).__name__}"
        return None
    if type_name in ("datetime", "date"):
        return None if isinstance(value, str) else f"{path}: a date string"
    if not isinstance(value, SCALARS[type_name]) or (isinstance(value, bool) and type_name != "bool"):
        return f"{path}: {type_name}, not {type(value).__name__} ({value!r})"
    return None


def load_typed(value: Any, type_name: str, path: str, problems: list[str]) -> Any:
    """`value` built into the openapi type `type_name` (a model class name, list[...], dict(str, ...)); each key no
    model declares, each value of the wrong kind and each model that refuses its arguments goes into `problems`."""
    type_name = TYPE_ALIASES.get(type_name, type_name)
    if value is None or type_name in ("object", "Any"):
        return value
    if type_name in SCALARS or type_name in ("quantity", "datetime", "date"):
        if (problem := scalar_problem(value, type_name, path)) is not None:
            problems.append(problem)
        return value
    if match := LIST_TYPE.fullmatch(type_name):
        if not isinstance(value, list):
            problems.append(f"{path}: a list")
            return value
        return [load_typed(item, match.group(1), f"{path}[{index}]", problems) for index, item in enumerate(value)]
    if match := DICT_TYPE.fullmatch(type_name):
        if not isinstance(value, dict):
            problems.append(f"{path}: a mapping")
            return value
        return {key: load_typed(item, match.group(2), f"{path}.{key}", problems) for key, item in value.items()}
    return load_model(value, type_name, path, problems)


def load_model(value: Any, type_name: str, path: str, problems: list[str]) -> Any:
    """`value` built into the SDK model `type_name`, each field through load_typed."""
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


def check_kserve(document: dict[str, Any], model_name: str) -> list[str]:
    """Problems of a KServe document; none means it loaded, whole, into the SDK's typed models."""
    problems: list[str] = []
    loaded = load_typed(document, model_name, document.get("kind", "?"), problems)
    if not problems and not isinstance(loaded, getattr(kserve_models, model_name)):
        problems.append(f"{document.get('kind')}: did not load into {model_name}")
    return problems
