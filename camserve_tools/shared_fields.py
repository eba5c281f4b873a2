"""Keyword arguments for a dataclass from an object that has fields of the same names."""

from __future__ import annotations

import dataclasses
from typing import Any


def shared_fields(source: object, target: type, **overrides: Any) -> dict[str, Any]:
    """The init fields of dataclass `target` that `source` (parsed arguments, another dataclass) has under the same
    names, with `overrides` over them: what `target(**...)` takes, without spelling every name twice."""
    names = (field.name for field in dataclasses.fields(target) if field.init)
    return {**{name: getattr(source, name) for name in names if hasattr(source, name)}, **overrides}
