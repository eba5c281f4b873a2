"""What decides whether an archive may be kept: the model's name, its preprocessing, its labels, and the probe call
that builds and runs the model from the unpacked archive alone (camserve_tools/archive/probe.py).

Anything wrong is an `ArchiveError` whose one-line message names the problem; the archive is then not written.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from camserve.model_spec import ModelSpec

PROBE = Path(__file__).resolve().with_name("probe.py")
# A model name as TorchServe's management API accepts one; it is also the archive's file name, so it can name
# neither a folder nor anything a shell or a URL would read specially.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_MODEL_NAME_LENGTH = 128
# The model's input, per side: below this a convolutional network has nothing left to map, above it one dummy
# forward pass alone needs gigabytes.
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 8, 4096
# The probe builds the model and runs a few forwards and a map on the CPU: a model that takes longer than this is
# reported as crashed rather than left to hang the build.
PROBE_TIMEOUT_S = 600


class ArchiveError(ValueError):
    """What is wrong with an archive request, in one line: the archive is not written."""


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a served model's name (and its archive's file name), or None when it can."""
    if len(name) > MAX_MODEL_NAME_LENGTH:
        return f"model name {name[:40]!r}... is {len(name)} characters long, over {MAX_MODEL_NAME_LENGTH}"
    if not MODEL_NAME_PATTERN.fullmatch(name):
        return f"model name {name!r} must be letters, digits, '_', '.' and '-', starting with a letter or digit"
    return None


def check_model_name(name: str) -> None:
    """Raise ArchiveError naming why `name` cannot be a served model's name."""
    if (problem := model_name_problem(name)) is not None:
        raise ArchiveError(f"NAME: {problem}")


def check_preprocessing(spec: ModelSpec) -> None:
    """Normalisation and input size that every request can go through: finite MEAN and STD, STD above zero (a zero
    or non-finite value makes every input tensor inf or nan), and sides within [MIN_INPUT_SIDE, MAX_INPUT_SIDE]."""
    height, width = spec.input_size
    if not all(isinstance(side, int) and MIN_INPUT_SIDE <= side <= MAX_INPUT_SIDE for side in (height, width)):
        raise ArchiveError(
            f"INPUT_SIZE {height},{width}: each side must be a whole number of pixels from {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE}"
        )
    for option, values in (("MEAN", spec.mean), ("STD", spec.std)):
        if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ArchiveError(f"{option}={','.join(map(str, values))}: must be three finite numbers (r,g,b)")
    if min(spec.std) <= 0:
        raise ArchiveError(f"STD={','.join(map(str, spec.std))}: every value must be above 0 (the input is divided by it)")


def check_labels(model_dir: Path, labels: str | None, num_classes: int) -> None:
    """LABELS must name exactly the classes the probed model outputs: keys 0..num_classes-1."""
    if not labels:
        return
    mapping = json.loads((model_dir / labels).read_text())
    wanted = {str(i) for i in range(num_classes)}
    if set(mapping) != wanted:
        raise ArchiveError(
            f"LABELS has {len(mapping)} entries (keys {_key_range(mapping)}), the model outputs {num_classes} classes (keys "
            f"0..{num_classes - 1})"
        )


def _key_range(mapping: dict) -> str:
    keys = sorted(mapping, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    return f"{keys[0]}..{keys[-1]}" if keys else "none"


def probe_archive(mar: Path) -> dict[str, Any]:
    """Unpack `mar` and build, run and map its model there as a worker would (camserve_tools/archive/probe.py):
    {"num_classes", "layers"}, or {"error": "<one line>"}."""
    with tempfile.TemporaryDirectory(prefix="camserve-probe-") as unpacked:
        with zipfile.ZipFile(mar) as archive:
            archive.extractall(unpacked)
        # PYTHONPATH empty and cwd in the unpacked archive: what TorchServe gives a worker (plus its model dir).
        environment = {**os.environ, "PYTHONPATH": "", "TMPDIR": unpacked}
        try:
            completed = subprocess.run(
                [sys.executable, str(PROBE), unpacked],
                cwd=unpacked,
                env=environment,
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"the model check took over {PROBE_TIMEOUT_S} s: a forward pass this slow cannot serve"}
    lines = completed.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = " ".join(completed.stderr.strip().splitlines()[-3:])
        return {"error": f"the model check crashed (exit {completed.returncode}): {tail[:400]}"}
