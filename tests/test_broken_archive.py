"""A model whose handler cannot load fails loudly at start, not as a healthy /ping with hanging requests."""

from __future__ import annotations

import shutil

import pytest
import yaml
from support import ROOT, start_server

from camserve_tools.archive.packing import build_archive

pytestmark = pytest.mark.server


def test_a_handler_that_cannot_load_stops_the_start_with_its_error(tmp_path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "shapes", model_dir)
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    config["handler"]["architecture"] = "camserve.models.missing_module:Net"
    (model_dir / "model-config.yaml").write_text(yaml.safe_dump(config))
    mar = build_archive("broken", model_dir, tmp_path / "store")
    # The start itself raises, naming the architecture it could not import (no healthy /ping to wait on).
    with pytest.raises(RuntimeError, match="cannot import architecture 'camserve.models.missing_module:Net'"):
        start_server(tmp_path / "server", {"broken": mar})
    assert not (tmp_path / "server" / "torchserve.pid").exists()  # and the server it started is gone
