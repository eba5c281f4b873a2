"""`camserve evaluate` and `camserve explain` against hostile data: annotations, inputs, --out and the journal.

Each test is a reproduction of an attack or a breakage, run through the real command (a subprocess, or its main()
where a bound must be lowered to be reachable in a test).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from support import ROOT, SHAPES_MAR, TEST_SEED_START, run_camserve

from camserve_tools.cli import main as camserve_main
from camserve_tools.data.scene_dataset import write_scene_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-dataset")
    write_scene_dataset(root, 4, first_seed=TEST_SEED_START + 6000)
    return root


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


@pytest.mark.slow
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
    result = run_camserve("evaluate", model, dataset / "images", "--boxes", boxes, "--out", out, *options)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "data errors" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    problems = {error["where"]: error["problem"] for error in metrics["data_errors"]}
    assert metrics["data_error_count"] == len(problems) == 10, problems
    assert any("width 0" in p for p in problems.values())
    assert any("height -5" in p for p in problems.values())
    assert any("not four finite numbers" in p for p in problems.values())
    assert any("names no image" in p for p in problems.values())
    assert any("names no category" in p for p in problems.values())
    assert any("climbs out of DATA" in p for p in problems.values())
    assert any("is absolute" in p for p in problems.values())
    assert any("file_name" in p for p in problems.values())
    # Only the four images inside DATA were read and scored.
    assert metrics["images"] == 4
    assert not metrics["failed_images"]
    assert all(Path(entry["image"]).parent == dataset / "images" for entry in metrics["worst"])
    # worst/ is this run's, whole: the class with a '/' makes a plain file name, and the last run's file is gone.
    worst = sorted(path.name for path in (out / "worst").iterdir())
    assert len(worst) == len(metrics["worst"]) > 0
    assert "from-the-last-run.png" not in worst
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
    assert len(problems) == 4, problems
    assert len(annotated.images) == 1, problems
    assert "no area" in problems[0]
    assert "no <bndbox>" in problems[1]
    assert "could not convert" in problems[2]
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
    assert "is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"


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


@pytest.mark.server
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
    result = run_camserve("explain", SHAPES_MAR, listing, fifo, "--out", out, "--json", "--quiet", timeout=240)
    assert result.returncode == 1, result.stderr  # the run finished (no hang, no MemoryError); three inputs failed
    report = json.loads(result.stdout)
    assert (report["inputs"], report["failed"]) == (4, 3)
    lines = {Path(line["path"]).name: line for line in map(json.loads, (out / "explanations.jsonl").read_text().splitlines())}
    assert lines["zero"]["status"] == 400
    assert "character device" in lines["zero"]["answer"]["message"]
    assert lines["pipe.png"]["status"] == 400
    assert "FIFO" in lines["pipe.png"]["answer"]["message"]
    assert lines["huge.png"]["status"] == 413
    assert lines["huge.png"]["answer"]["type"] == "file_too_large"
    assert lines[image.name]["status"] == 200


@pytest.mark.server
def test_explain_out_that_is_a_file_or_leads_to_an_input_folder_is_a_usage_error(dataset: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    shutil.copytree(dataset / "images", images)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert camserve_main(["explain", str(SHAPES_MAR), str(images), "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"
    link = tmp_path / "out-link"
    link.symlink_to(images)
    assert camserve_main(["explain", str(SHAPES_MAR), str(images), "--out", str(link)]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert sorted(path.name for path in images.iterdir()) == sorted(path.name for path in (dataset / "images").iterdir())


@pytest.mark.server
def test_explain_out_inside_an_input_folder_through_a_symlink_never_explains_its_own_maps(dataset: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    shutil.copytree(dataset / "images", images)
    (images / "explained").mkdir()
    link = tmp_path / "out-link"
    link.symlink_to(images / "explained")
    for _ in range(2):
        assert camserve_main(["explain", str(SHAPES_MAR), str(images), "--out", str(link), "--json", "--quiet"]) == 0
        assert json.loads(capsys.readouterr().out)["inputs"] == 4


@pytest.mark.server
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
