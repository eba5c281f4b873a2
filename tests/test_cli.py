"""The `camserve` command as a pipeline runs it: a subprocess on real files, judged by exit code, JSON and files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import ROOT, SHAPES_MAR, TEST_SEED_START, run_camserve

from camserve_tools.data.scene_dataset import write_scene_dataset
from camserve_tools.data.scenes import CLASSES

METRIC_KEYS = ("top1", "pointing_game", "iou50", "deletion_auc", "insertion_auc", "randomization_spearman")


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 scenes with their COCO file and VOC folder, from the tests' own seed range."""
    root = tmp_path_factory.mktemp("scene-dataset")
    write_scene_dataset(root, 40, first_seed=TEST_SEED_START + 3000)
    return root


@pytest.fixture
def scene_folder(dataset: Path, tmp_path: Path) -> Path:
    """Eight scenes (two in a subfolder, one of them a JPEG) and one file that only claims to be an image."""
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    images = sorted((dataset / "images").glob("*.png"))[:8]
    for image in images[:6]:
        shutil.copy2(image, folder / image.name)
    shutil.copy2(images[6], folder / "sub" / images[6].name)
    Image.open(images[7]).save(folder / "sub" / "photo.jpg", quality=90)
    (folder / "sub" / "broken.png").write_bytes(b"this is not a PNG")
    return folder


@pytest.mark.server
def test_explain_writes_a_line_per_image_an_error_line_for_a_bad_file_and_resumes(scene_folder: Path) -> None:
    out = scene_folder / "explained"  # inside the input folder: its maps must never become inputs
    first = run_camserve("explain", SHAPES_MAR, scene_folder, "--out", out, "--batch-size", "4", "--json")
    assert first.returncode == 1, first.stderr  # one image failed
    report = json.loads(first.stdout)
    assert (report["inputs"], report["explained"], report["skipped"], report["failed"]) == (9, 9, 0, 1)
    lines = json_lines(out / "explanations.jsonl")
    assert len(lines) == 9
    assert len({line["path"] for line in lines}) == 9
    bad = next(line for line in lines if line["path"].endswith("broken.png"))
    assert bad["status"] == 400
    assert bad["answer"]["type"] == "invalid_image"
    assert bad["file"] is None
    for line in lines:
        if line is bad:
            continue
        assert line["status"] == 200
        assert line["answer"]["predictions"][0]["label"] in CLASSES
        cam = line["answer"]["cam"]
        with Image.open(line["path"]) as image, Image.open(out / line["file"]) as heatmap:
            assert image.size == tuple(cam["size"])
            assert heatmap.size == tuple(cam["heatmap_size"])
            assert heatmap.mode == "L"
            # The peak, in image pixels, lands on the hot part of the (smaller) heat map.
            x, y = (int(v * m / i) for v, m, i in zip(cam["peak"], heatmap.size, image.size, strict=True))
            assert np.asarray(heatmap)[y, x] >= 0.8 * np.asarray(heatmap).max()

    # An interrupted run: five lines done, the sixth cut mid-way. The next run does the rest, once each.
    journal = out / "explanations.jsonl"
    text = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(text[:5]) + text[5][:40])
    second = run_camserve("explain", SHAPES_MAR, scene_folder, "--out", out, "--json", "--quiet")
    assert second.returncode == 1, second.stderr  # the bad file is still failed
    report = json.loads(second.stdout)
    assert (report["skipped"], report["explained"], report["failed"]) == (5, 4, 1)
    lines = json_lines(journal)
    assert sorted(line["path"] for line in lines) == sorted({line["path"] for line in lines})
    assert len(lines) == 9


@pytest.mark.slow
def test_explain_overlays_from_a_list_file_and_a_model_directory(dataset: Path, tmp_path: Path) -> None:
    images = sorted((dataset / "images").glob("*.png"))[:2]
    listing = tmp_path / "list.txt"
    listing.write_text("# two scenes\n" + "\n".join(str(path) for path in images) + "\n")
    out = tmp_path / "out"
    result = run_camserve("explain", ROOT / "models" / "shapes", listing, "--out", out, "--output", "overlay", "--method", "cam")
    assert result.returncode == 0, result.stderr
    assert "explained" in result.stdout  # the table for people
    lines = json_lines(out / "explanations.jsonl")
    assert [line["status"] for line in lines] == [200, 200]
    for line, path in zip(lines, images, strict=True):
        assert line["answer"]["cam"]["method"] == "cam"
        assert line["file"].startswith("overlays/")
        with Image.open(out / line["file"]) as overlay, Image.open(path) as image:
            assert overlay.size == image.size
            assert overlay.mode == "RGB"


@pytest.mark.server
def test_usage_errors_exit_2_before_any_work(tmp_path: Path, dataset: Path) -> None:
    missing = run_camserve("explain", SHAPES_MAR, tmp_path / "nothing-here.png", "--out", tmp_path / "out")
    assert missing.returncode == 2
    assert "no such image" in missing.stderr
    unknown = run_camserve(
        "evaluate", SHAPES_MAR, dataset / "images", "--boxes", dataset / "coco.json", "--out", tmp_path / "eval", "--min", "accuracy=0.9"
    )
    assert unknown.returncode == 2
    assert "unknown key 'accuracy'" in unknown.stderr
    assert not (tmp_path / "eval").exists()


@pytest.fixture(scope="module")
def coco_metrics(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("evaluate-coco")
    result = run_camserve(
        "evaluate",
        SHAPES_MAR,
        dataset / "images",
        "--boxes",
        dataset / "coco.json",
        "--out",
        out,
        "--steps",
        "8",
        "--worst",
        "3",
        "--min",
        "top1=0.8",
        "--min",
        "pointing_game=0.6",
        "--json",
    )
    return result, out


@pytest.mark.server
def test_evaluate_with_coco_boxes_writes_plausible_metrics(coco_metrics) -> None:
    result, out = coco_metrics
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(result.stdout)["top1"] == metrics["top1"]
    assert metrics["images"] == metrics["maps"] == 40
    for key in METRIC_KEYS:
        assert key in metrics, key
        assert all(key in figures for figures in metrics["per_class"].values()), key
    assert set(metrics["per_class"]) <= set(CLASSES)
    assert metrics["top1"] >= 0.8
    assert metrics["pointing_game"] >= 0.6
    assert metrics["iou50"] >= 0.4
    assert 0 <= metrics["deletion_auc"] < metrics["insertion_auc"] <= 1  # the map ranks the pixels the model needs first
    assert metrics["randomization_spearman"] < 0.5  # the maps depend on the learned weights
    assert [v["passed"] for v in metrics["thresholds"]] == [True, True]
    assert "| overall |" in (out / "summary.md").read_text()
    assert len(list((out / "worst").glob("*.png"))) == 3


@pytest.mark.server
def test_evaluate_with_voc_boxes_agrees_and_a_breached_threshold_exits_1(coco_metrics, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "voc"
    result = run_camserve(
        "evaluate",
        SHAPES_MAR,
        dataset / "images",
        "--boxes",
        dataset / "voc",
        "--out",
        out,
        "--steps",
        "4",
        "--no-sanity",
        "--worst",
        "0",
        "--min",
        "top1=1.01",
        "--quiet",
    )
    assert result.returncode == 1
    assert "threshold breached: top1" in result.stderr
    voc = json.loads((out / "metrics.json").read_text())
    coco = json.loads((coco_metrics[1] / "metrics.json").read_text())
    # The same boxes in the other format: the same images, predictions, peaks and map boxes are judged alike.
    for key in ("images", "top1", "pointing_game", "iou50", "mean_iou"):
        assert voc[key] == coco[key], key
    assert voc["passed"] is False
    assert voc["thresholds"][0]["passed"] is False


@pytest.mark.server
@pytest.mark.parametrize("engine", ["torchserve", "kserve"])
def test_smoke_passes_the_real_archive(engine: str) -> None:
    result = run_camserve("smoke", SHAPES_MAR, "--engine", engine, "--json", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"]
    assert report["model"] == "shapes"
    assert report["stage"] == "done"
    assert report["engine"] == engine
    assert len(report["probes"]) == 4
    assert all(probe["ok"] for probe in report["probes"])
    assert report["probes"][-1]["status"] == 400  # the body that is not an image


@pytest.mark.server
def test_smoke_fails_a_truncated_archive_cleanly(tmp_path: Path) -> None:
    truncated = tmp_path / "shapes.mar"
    truncated.write_bytes(SHAPES_MAR.read_bytes()[: SHAPES_MAR.stat().st_size // 2])
    result = run_camserve("smoke", truncated, "--json", "--quiet")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert not report["ok"]
    assert report["stage"] == "inspect"
    assert "truncated" in report["error"]


# -- the readers and metrics behind evaluate, in-process (no model) ---------------------------------------------------


def test_coco_and_voc_boxes_read_back_as_the_scenes_drew_them(dataset: Path) -> None:
    from camserve_tools.data.annotations import read_annotations
    from camserve_tools.data.scenes import make_scene

    for boxes in (dataset / "coco.json", dataset / "voc"):
        annotated = read_annotations(boxes, dataset / "images", list(CLASSES))
        assert len(annotated.images) == 40
        assert not annotated.unmatched_labels
        assert not annotated.missing_images
        for image in annotated.images[:5]:
            scene = make_scene(int(image.path.stem.split("_")[1]))
            assert [(obj.class_index, obj.box) for obj in image.objects] == [(scene.label, tuple(float(v) for v in scene.box))]


@pytest.mark.parametrize(
    ("content", "suffix"),
    [
        (b"{not json", ".json"),
        (b"[" * 100_000 + b"]" * 100_000, ".json"),
        (b"[]", ".json"),
        (b'{"images": {"id": 1}, "annotations": [], "categories": []}', ".json"),
        (b"<annotation><object>", ".xml"),
        (b"boxes", ".txt"),
    ],
)
def test_a_malformed_boxes_file_is_an_annotation_error(tmp_path: Path, content: bytes, suffix: str) -> None:
    from camserve_tools.data.annotations import AnnotationError, read_annotations

    boxes = tmp_path / f"boxes{suffix}"
    boxes.write_bytes(content)
    with pytest.raises(AnnotationError):
        read_annotations(boxes, tmp_path, list(CLASSES))


def test_deletion_and_insertion_reward_a_map_on_the_pixels_the_score_reads() -> None:
    import torch

    from camserve_tools.quality.saliency_metrics import deletion_insertion_auc

    pixels = torch.zeros(3, 16, 16)
    pixels[:, 4:8, 4:8] = 1.0  # the "object"; the score is its mean brightness
    right = torch.zeros(16, 16)
    right[4:8, 4:8] = 1.0

    def score(batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :, 4:8, 4:8].mean(dim=(1, 2, 3))

    deletion, insertion = deletion_insertion_auc(score, pixels, right, steps=16)
    wrong_deletion, wrong_insertion = deletion_insertion_auc(score, pixels, 1.0 - right, steps=16)
    assert deletion < wrong_deletion
    assert insertion > wrong_insertion
