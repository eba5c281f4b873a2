"""The `camserve` command and its servers against hostile files: archives, annotations, inputs, --out, make variables.

Each test is a reproduction of an attack or a breakage, run through the real command (a subprocess, or its main()
where a bound must be lowered to be reachable in a test) and, where it serves, a real TorchServe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests
import yaml
from support import ROOT, SHAPES_MAR, TEST_SEED_START

from camserve_tools.cli import main as camserve_main
from camserve_tools.data.scene_dataset import write_scene_dataset

PYTHON = ROOT / ".venv" / "bin" / "python"


def camserve(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    python = str(PYTHON) if PYTHON.exists() else sys.executable
    return subprocess.run([python, "-m", "camserve_tools.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-dataset")
    write_scene_dataset(root, 4, first_seed=TEST_SEED_START + 6000)
    return root


# -- smoke: the archive decides nothing outside the run dir ----------------------------------------------------------


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


def test_smoke_refuses_a_member_that_climbs_out_and_a_zip_bomb(tmp_path: Path, capsys, monkeypatch) -> None:
    from camserve_tools.commands import smoke

    climbing = copy_with_members(SHAPES_MAR, tmp_path / "climbing.mar", {"../../outside.txt": b"x"})
    assert camserve_main(["smoke", str(climbing), "--json", "--quiet"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["stage"] == "inspect" and "points outside the archive" in report["error"]

    # 64 MiB of zeros in 64 KiB of archive; the bound lowered so that the test need not write gigabytes.
    monkeypatch.setattr(smoke, "MAX_UNPACKED_BYTES", 32 * 1024**2)
    bomb = copy_with_members(SHAPES_MAR, tmp_path / "bomb.mar", {"zeros.bin": bytes(64 * 1024**2)})
    assert bomb.stat().st_size < SHAPES_MAR.stat().st_size + 1024**2
    assert camserve_main(["smoke", str(bomb), "--json", "--quiet"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["stage"] == "inspect" and "unpacks to" in report["error"]


@pytest.mark.serving
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
    started = time.monotonic()
    result = camserve("smoke", refused, "--json", "--quiet", "--timeout", "300")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["stage"] == "start" and "could not load a model" in report["error"] and "Runtime" in report["error"]
    assert time.monotonic() - started < 200  # far below the 300 s it would otherwise wait


# -- servers: worker sockets on a short path, whatever the run dir ---------------------------------------------------


@pytest.mark.serving
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
        assert socket_dir is not None and len(str(socket_dir / ".ts.sock.65535")) <= UNIX_SOCKET_PATH_MAX
        assert any((deep / "tmp").glob(".ts.sock.*"))  # the sockets themselves live in the run dir
        response = requests.post(f"{server.inference_url}/predictions/shapes", data=sample_image_png(), timeout=60)
        assert response.status_code == 200 and response.json()["predictions"][0]["label"]
    finally:
        server.stop()
    assert not socket_dir.parent.exists() and server.socket_dir is None  # the short path is removed on stop


# -- evaluate: bad annotations are data errors, DATA is a boundary, the results are always written -------------------


def hostile_coco(dataset: Path, outside: Path) -> dict:
    """The dataset's COCO file with every kind of bad entry added beside its four good ones."""
    coco = json.loads((dataset / "coco.json").read_text())
    assert coco["categories"][0] == {"id": 1, "name": "circle", "supercategory": "shape"}
    coco["categories"][0]["name"] = "T-shirt/top"  # the model's class 0 in this test
    first = coco["images"][0]
    coco["images"] += [
        {"id": 101, "file_name": f"../{outside.name}"},  # exists, one level above DATA
        {"id": 102, "file_name": str(outside)},  # exists, absolute
        {"id": 103},  # no file_name
    ]
    good = dict(coco["annotations"][0])
    coco["annotations"] += [
        {**good, "id": 201, "bbox": [10, 10, 0, 20]},  # width 0
        {**good, "id": 202, "bbox": [10, 10, 20, -5]},  # height < 0
        {**good, "id": 203, "bbox": [10, "NaN", 20, 20]},
        {**good, "id": 204, "bbox": [1, 2, 3]},
        {**good, "id": 205, "image_id": 999},
        {**good, "id": 206, "category_id": 12345},
        {**good, "id": 207, "image_id": 101},
        {**good, "id": 208, "image_id": 102},
        [1, 2, 3],
        # a "T-shirt/top" on the first image: its map lands in worst/.
        {**good, "id": 209, "image_id": first["id"], "category_id": 1},
    ]
    return coco


def test_evaluate_writes_metrics_whatever_the_annotations_hold(dataset: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "shapes", model)
    labels = json.loads((model / "index_to_name.json").read_text())
    labels["0"] = "T-shirt/top"  # a label with a '/' (Fashion-MNIST's first class)
    (model / "index_to_name.json").write_text(json.dumps(labels))
    outside = dataset / "outside.png"  # beside DATA (dataset/images), never to be read
    shutil.copy2(sorted((dataset / "images").glob("*.png"))[0], outside)
    boxes = tmp_path / "coco.json"
    boxes.write_text(json.dumps(hostile_coco(dataset, outside)))
    out = tmp_path / "eval"
    (out / "worst").mkdir(parents=True)
    (out / "worst" / "from-the-last-run.png").write_bytes(b"old")

    options = ("--steps", "2", "--no-sanity", "--json", "--quiet")
    result = camserve("evaluate", model, dataset / "images", "--boxes", boxes, "--out", out, *options)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "data errors" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    problems = {error["where"]: error["problem"] for error in metrics["data_errors"]}
    assert metrics["data_error_count"] == len(problems) == 10, problems
    assert any("width 0" in p for p in problems.values()) and any("height -5" in p for p in problems.values())
    assert any("not four finite numbers" in p for p in problems.values())
    assert any("names no image" in p for p in problems.values()) and any("names no category" in p for p in problems.values())
    assert any("climbs out of DATA" in p for p in problems.values()) and any("is absolute" in p for p in problems.values())
    assert any("file_name" in p for p in problems.values())
    # Only the four images inside DATA were read and scored.
    assert metrics["images"] == 4 and not metrics["failed_images"]
    assert all(Path(entry["image"]).parent == dataset / "images" for entry in metrics["worst"])
    # worst/ is this run's, whole: the class with a '/' makes a plain file name, and the last run's file is gone.
    worst = sorted(path.name for path in (out / "worst").iterdir())
    assert len(worst) == len(metrics["worst"]) > 0 and "from-the-last-run.png" not in worst
    assert any("T-shirt_top" in name for name in worst), worst
    assert all(entry["file"] for entry in metrics["worst"])
    assert not [path for path in out.iterdir() if path.name.startswith(".")]  # no staging left behind
    assert "data errors" in (out / "summary.md").read_text()


def test_voc_boxes_without_area_or_bndbox_are_named_data_errors(dataset: Path, tmp_path: Path) -> None:
    from camserve_tools.data.annotations import read_annotations
    from camserve_tools.data.scenes import CLASSES

    voc = tmp_path / "voc"
    shutil.copytree(dataset / "voc", voc)
    files = sorted(voc.glob("*.xml"))
    text = files[0].read_text()
    xmin = text.split("<xmin>")[1].split("</xmin>")[0]
    files[0].write_text(text.replace(f"<xmax>{text.split('<xmax>')[1].split('</xmax>')[0]}</xmax>", f"<xmax>{int(xmin) - 2}</xmax>"))
    files[1].write_text(files[1].read_text().replace("<bndbox>", "<nothing>").replace("</bndbox>", "</nothing>"))
    files[2].write_text(files[2].read_text().replace("<filename>", "<filename>../../").replace("<ymax>", "<ymax>x"))
    annotated = read_annotations(voc, dataset / "images", list(CLASSES))
    problems = [f"{error.where}: {error.problem}" for error in annotated.data_errors]
    assert len(problems) == 4 and len(annotated.images) == 1, problems
    assert "no area" in problems[0] and "no <bndbox>" in problems[1] and "could not convert" in problems[2]
    assert "climbs out of DATA" in problems[3]


def test_evaluate_refuses_a_coco_file_nested_beyond_recursion_and_an_out_that_is_a_file(dataset: Path, tmp_path: Path, capsys) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    out = tmp_path / "eval"
    args = ["evaluate", str(ROOT / "models" / "shapes"), str(dataset / "images"), "--no-sanity", "--quiet"]
    assert camserve_main([*args, "--boxes", str(deep), "--out", str(out)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert camserve_main([*args, "--boxes", str(dataset / "coco.json"), "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "keep me"


def test_evaluate_keeps_the_last_worst_folder_until_the_new_one_is_whole(tmp_path: Path, monkeypatch) -> None:
    """A run stopped while drawing (Ctrl-C, a full disk) leaves the last run's worst/ as it was."""
    from camserve_tools.commands import evaluate

    out = tmp_path / "eval"
    (out / "worst").mkdir(parents=True)
    (out / "worst" / "01_last_run.png").write_bytes(b"old")

    def interrupted(folder: Path, _evaluation: object) -> list:
        (folder / "01_half_drawn.png").write_bytes(b"new")
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "write_worst", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate.write_outputs(out, {"worst": []}, evaluate.Evaluation())
    assert [path.name for path in (out / "worst").iterdir()] == ["01_last_run.png"]
    assert sorted(path.name for path in out.iterdir()) == ["worst"]


# -- explain: bounded reads, no devices or FIFOs, --out checked ------------------------------------------------------


def test_explain_refuses_devices_fifos_and_oversized_files_without_reading_them(dataset: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.png"
    with huge.open("wb") as file:  # sparse: 40 MB long, nothing written
        file.truncate(40 * 1024 * 1024)
    image = sorted((dataset / "images").glob("*.png"))[0]
    listing = tmp_path / "list.txt"
    listing.write_text(f"/dev/zero\n{fifo}\n{huge}\n{image}\n")
    out = tmp_path / "out"
    result = camserve("explain", SHAPES_MAR, listing, fifo, "--out", out, "--json", "--quiet", timeout=240)
    assert result.returncode == 1, result.stderr  # the run finished (no hang, no MemoryError); three inputs failed
    report = json.loads(result.stdout)
    assert (report["inputs"], report["failed"]) == (4, 3)
    lines = {Path(line["path"]).name: line for line in map(json.loads, (out / "explanations.jsonl").read_text().splitlines())}
    assert lines["zero"]["status"] == 400 and "character device" in lines["zero"]["answer"]["message"]
    assert lines["pipe.png"]["status"] == 400 and "FIFO" in lines["pipe.png"]["answer"]["message"]
    assert lines["huge.png"]["status"] == 413 and lines["huge.png"]["answer"]["type"] == "file_too_large"
    assert lines[image.name]["status"] == 200


def test_explain_out_that_is_a_file_or_leads_to_an_input_folder_is_a_usage_error(dataset: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    shutil.copytree(dataset / "images", images)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert camserve_main(["explain", str(SHAPES_MAR), str(images), "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "keep me"
    link = tmp_path / "out-link"
    link.symlink_to(images)
    assert camserve_main(["explain", str(SHAPES_MAR), str(images), "--out", str(link)]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert sorted(path.name for path in images.iterdir()) == sorted(path.name for path in (dataset / "images").iterdir())


def test_explain_out_inside_an_input_folder_through_a_symlink_never_explains_its_own_maps(dataset: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    shutil.copytree(dataset / "images", images)
    (images / "explained").mkdir()
    link = tmp_path / "out-link"
    link.symlink_to(images / "explained")
    for _ in range(2):
        assert camserve_main(["explain", str(SHAPES_MAR), str(images), "--out", str(link), "--json", "--quiet"]) == 0
        assert json.loads(capsys.readouterr().out)["inputs"] == 4


def test_explain_refuses_a_journal_that_is_not_a_regular_file(tmp_path: Path, dataset: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "explanations.jsonl")
    assert camserve_main(["explain", str(SHAPES_MAR), str(dataset / "images"), "--out", str(out), "--quiet"]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_the_journal_cuts_a_partial_last_line_reading_only_its_tail(tmp_path: Path) -> None:
    from camserve_tools.commands.journal import Journal

    path = tmp_path / "explanations.jsonl"
    long_line = json.dumps({"path": "/a.png", "status": 200, "answer": {"pad": "x" * 200_000}}) + "\n"
    path.write_text(long_line + '{"path": "/b.png", "status": 200, "ans' + "y" * 150_000)
    journal = Journal(path)
    assert journal.statuses == {"/a.png": 200}
    with journal.open_for_append():
        pass
    assert path.read_text() == long_line


# -- archive: normalisation, input size, the real preprocessing, make variables ------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
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
    assert code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mar"))


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
    assert batch.shape == (2, 3, *spec.input_size) and torch.isfinite(batch).all()
    # Pictures normalised with the archive's own mean and std: values an image, not torch.randn, would have.
    low, high = [(0 - m) / s for m, s in zip(spec.mean, spec.std)], [(1 - m) / s for m, s in zip(spec.mean, spec.std)]
    for channel in range(3):
        assert low[channel] - 1e-4 <= batch[:, channel].min() and batch[:, channel].max() <= high[channel] + 1e-4


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
