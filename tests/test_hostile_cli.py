"""The `camserve` command and its servers against hostile archives, settings and make variables.

Each test is a reproduction of an attack or a breakage, run through the real command (a subprocess, or its main()
where a bound must be lowered to be reachable in a test) and, where it serves, a real TorchServe. Hostile
annotations and inputs of evaluate and explain: test_hostile_data.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import requests
import yaml
from support import ROOT, SHAPES_MAR, run_camserve

from camserve_tools.cli import main as camserve_main


def copy_with_manifest(source: Path, target: Path, **model_fields: object) -> Path:
    """A copy of the archive `source` whose MANIFEST.json `model` section has `model_fields` changed."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as copy:
        for member in original.infolist():
            data = original.read(member.filename)
            if member.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"].update(model_fields)
                data = json.dumps(manifest).encode()
            copy.writestr(member, data)
    return target


def copy_with_members(source: Path, target: Path, extra: dict[str, bytes]) -> Path:
    shutil.copy2(source, target)
    with zipfile.ZipFile(target, "a", zipfile.ZIP_DEFLATED) as archive:
        for name, data in extra.items():
            archive.writestr(name, data)
    return target


# -- smoke: the archive decides nothing outside the run dir ----------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("name", ["../../victim/evil", "{victim}/evil", "shapes/../../../victim/evil", "bad name", "-lead", 'x"; touch X'])
def test_smoke_refuses_a_manifest_model_name_that_is_not_a_plain_name(tmp_path: Path, name: str) -> None:
    """Copied as <run dir>/model_store/<name>.mar, "../../victim/evil" would land in tmp_path/victim."""
    victim = tmp_path / "victim"
    victim.mkdir()
    hostile = copy_with_manifest(SHAPES_MAR, tmp_path / "hostile.mar", modelName=name.format(victim=victim))
    code = camserve_main(["smoke", str(hostile), "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    assert list(victim.iterdir()) == []
    assert not (tmp_path / "run" / "model_store").exists()  # nothing copied, no server started


@pytest.mark.server
def test_smoke_refuses_a_member_that_climbs_out_and_a_zip_bomb(tmp_path: Path, capsys, monkeypatch) -> None:
    from camserve_tools.commands import smoke

    climbing = copy_with_members(SHAPES_MAR, tmp_path / "climbing.mar", {"../../outside.txt": b"x"})
    assert camserve_main(["smoke", str(climbing), "--json", "--quiet"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["stage"] == "inspect"
    assert "points outside the archive" in report["error"]

    # 64 MiB of zeros in 64 KiB of archive; the bound lowered so that the test need not write gigabytes.
    monkeypatch.setattr(smoke, "MAX_UNPACKED_BYTES", 32 * 1024**2)
    bomb = copy_with_members(SHAPES_MAR, tmp_path / "bomb.mar", {"zeros.bin": bytes(64 * 1024**2)})
    assert bomb.stat().st_size < SHAPES_MAR.stat().st_size + 1024**2
    assert camserve_main(["smoke", str(bomb), "--json", "--quiet"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["stage"] == "inspect"
    assert "unpacks to" in report["error"]


@pytest.mark.server
def test_smoke_fails_fast_when_torchserve_refuses_the_archive(tmp_path: Path) -> None:
    """An archive the frontend will not register (here: a runtime it does not know) never answers: smoke says so as
    soon as the frontend logs it, not after --timeout."""
    refused = tmp_path / "refused.mar"
    with zipfile.ZipFile(SHAPES_MAR) as original, zipfile.ZipFile(refused, "w", zipfile.ZIP_DEFLATED) as copy:
        for member in original.infolist():
            data = original.read(member.filename)
            if member.filename == "MAR-INF/MANIFEST.json":
                data = json.dumps({**json.loads(data), "runtime": "python9"}).encode()
            copy.writestr(member, data)
    result = run_camserve("smoke", refused, "--json", "--quiet", "--timeout", "300")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    # Stopped at the start by the frontend's own refusal, not by --timeout (that would be a timeout at the answer).
    assert report["stage"] == "start"
    assert "could not load a model" in report["error"]
    assert "Runtime" in report["error"]


# -- servers: worker sockets on a short path, whatever the run dir ---------------------------------------------------


@pytest.mark.server
def test_a_server_starts_and_answers_from_a_run_dir_too_deep_for_a_unix_socket(tmp_path: Path) -> None:
    from camserve_tools.servers.torchserve import UNIX_SOCKET_PATH_MAX, TorchServe, sample_image_png

    deep = tmp_path / ("d" * 100) / ("e" * 50)
    assert len(str(deep / "tmp" / ".ts.sock.9000")) > UNIX_SOCKET_PATH_MAX
    store = deep / "store"
    store.mkdir(parents=True)
    shutil.copy2(SHAPES_MAR, store / "shapes.mar")
    config = ROOT / "config" / "dev.properties"
    server = TorchServe.on_free_ports(run_dir=deep, config=config, model_store=store, models="shapes=shapes.mar")
    socket_dir = None
    try:
        server.start(timeout=180)
        socket_dir = server.socket_dir
        assert socket_dir is not None
        assert len(str(socket_dir / ".ts.sock.65535")) <= UNIX_SOCKET_PATH_MAX
        assert any((deep / "tmp").glob(".ts.sock.*"))  # the sockets themselves live in the run dir
        response = requests.post(f"{server.inference_url}/predictions/shapes", data=sample_image_png(), timeout=60)
        assert response.status_code == 200
        assert response.json()["predictions"][0]["label"]
    finally:
        server.stop()
    assert not socket_dir.parent.exists()
    assert server.socket_dir is None


# -- archive: normalisation, input size, the real preprocessing, make variables ------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--std", "0,0,0", "above 0"),
        ("--std", "nan,0.2,0.2", "finite"),
        ("--mean", "inf,0.5,0.5", "finite"),
        ("--input-size", "100000", "8 to 4096"),
        ("--input-size", "4,224", "8 to 4096"),
    ],
)
def test_archive_refuses_normalisation_and_input_sizes_that_cannot_serve(
    tmp_path: Path, capsys, option: str, value: str, message: str
) -> None:
    weights = tmp_path / "weights.pt"  # never read: the option is refused first
    weights.write_bytes(b"")
    code = camserve_main(["archive", "--model", "resnet18", "--weights", str(weights), option, value, "--export-path", str(tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mar"))


@pytest.mark.slow
def test_archive_checks_a_model_dirs_normalisation_and_runs_its_probe_through_the_real_preprocessing(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "shapes", model)
    config_file = model / "model-config.yaml"
    config = yaml.safe_load(config_file.read_text())
    store = tmp_path / "store"
    # 1e-300 passes the configuration check (finite, above 0) and is zero as the float32 the preprocessing computes in.
    for std, message in (([0, 0, 0], "above 0"), ([1e-300, 1e-300, 1e-300], "the preprocessing")):
        config["handler"]["std"] = std
        config_file.write_text(yaml.safe_dump(config))
        assert camserve_main(["archive", "--name", "tiny_std", "--model-dir", str(model), "--export-path", str(store)]) == 1
        assert message in capsys.readouterr().err
    assert not store.exists() or not list(store.glob("*.mar"))


def test_archive_probe_sends_real_pictures_through_the_served_preprocessing() -> None:
    import torch

    from camserve.model_spec import ModelSpec
    from camserve_tools.archive.probe import model_inputs

    spec = ModelSpec.from_model_dir(ROOT / "models" / "shapes")
    batch = model_inputs(spec, 2)
    assert batch.shape == (2, 3, *spec.input_size)
    assert torch.isfinite(batch).all()
    # Pictures normalised with the archive's own mean and std: values an image, not torch.randn, would have.
    low, high = (
        [(0 - m) / s for m, s in zip(spec.mean, spec.std, strict=True)],
        [(1 - m) / s for m, s in zip(spec.mean, spec.std, strict=True)],
    )
    for channel in range(3):
        assert low[channel] - 1e-4 <= batch[:, channel].min()
        assert batch[:, channel].max() <= high[channel] + 1e-4


def make_checkout(tmp_path: Path) -> Path:
    """The Makefile and pyproject.toml in a scratch folder, with a .venv of the real bin/ and a fresh stamp: with
    make's -o .venv/.installed, nothing is ever reinstalled into the shared venv."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, copy / name)
    (copy / ".venv").mkdir()
    (copy / ".venv" / "bin").symlink_to((ROOT / ".venv" / "bin").resolve())
    (copy / ".venv" / ".installed").touch()
    return copy


def test_make_archive_never_runs_a_variables_value(tmp_path: Path) -> None:
    """Quotes, `$(shell)`, and backquotes in make variables reach the archive builder as plain text."""
    copy = make_checkout(tmp_path)
    hostile = {"NAME": 'x"; touch BY_NAME; echo "', "MEAN": "$(shell touch BY_MAKE)", "LABELS": "`touch BY_BACKQUOTE`"}
    result = subprocess.run(
        ["make", "-o", ".venv/.installed", "archive", *(f"{key}={value}" for key, value in hostile.items())],
        cwd=copy,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0  # refused by the builder: MEAN is not three numbers
    assert "$(shell touch BY_MAKE)" in result.stderr  # the value arrived as text
    created = [path for path in copy.rglob("BY_*")] + [path for path in ROOT.glob("BY_*")]
    assert not created, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("target", "hostile"),
    [
        ("serve", {"ENGINE": 'x"; touch BY_ENGINE; echo "', "CONFIG": "$(shell touch BY_CONFIG)"}),
        ("bench", {"BENCH_ARGS": "--rounds 1; touch BY_BENCH_ARGS `touch BY_BACKQUOTE` *"}),
        ("loadtest", {"LOADTEST_ARGS": "$$(touch BY_SUBSHELL)"}),
        ("kserve-bundle", {"PROTOCOL": "v1; touch BY_PROTOCOL", "BUNDLE_DIR": '"; touch BY_DIR; "'}),
    ],
)
def test_make_targets_never_run_a_variables_value(tmp_path: Path, target: str, hostile: dict[str, str]) -> None:
    """Every rule that takes a setting passes it as text: the command refuses it, nothing it names runs."""
    copy = make_checkout(tmp_path)
    (copy / "model_store").mkdir()
    for archive in ("shapes.mar", "imagenet.mar"):
        (copy / "model_store" / archive).touch()  # prerequisites only: every command here is refused before reading them
    result = subprocess.run(
        ["make", "-o", ".venv/.installed", "-o", "model_store/shapes.mar", "-o", "model_store/imagenet.mar", target]
        + [f"{key}={value}" for key, value in hostile.items()],
        cwd=copy,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0, result.stdout[-500:]
    created = [path for path in copy.rglob("BY_*")] + [path for path in ROOT.glob("BY_*")]
    assert not created, result.stdout + result.stderr
