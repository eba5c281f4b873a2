"""Train the default `shapes` model on synthetic scenes; writes models/shapes/{shapes_net.pt,index_to_name.json}.

    make train            # or: .venv/bin/python scripts/train_shapes.py

Deterministic up to bfloat16 rounding (fixed seeds, scenes from camserve_tools.data.scenes.TRAIN_SEEDS); timings on
2 CPU cores in docs/lab/shapes-model.md.

The recipe, and why (found by a sweep; see docs/lab/shapes-model.md):
- Plain cross-entropy on the class alone sits at chance for ~2,500 steps before the network finds the shapes;
  on 2 CPU cores that plateau alone would eat the budget.
- A dense loss gives every location of the 20x20 feature grid a label (the object's class inside its true box,
  background elsewhere) and breaks the plateau within a few hundred steps. Its per-location class logits are
  the CAM itself (the head's Linear applied at each location) and background is a constant 0 logit, so the
  loss teaches exactly what the map should show: class evidence above 0 on the object, below 0 elsewhere.
  No extra module: the served model is ShapesNet alone, GAP + Linear (whose logits are the CAM's mean).
- The first 15 % of steps see easy scenes (plain background, no clutter): a curriculum.
- bfloat16 autocast where the CPU has it natively: half a step's time, so twice the steps in the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision import transforms
from tqdm import tqdm

from camserve.models.shapes_net import MEAN, STD, TRAINING_SIZE, ShapesNet
from camserve_tools.data.scenes import CLASSES, TRAIN_SEEDS, make_scene

OUTPUT_DIR = Path(__file__).resolve().parent.parent / "models" / "shapes"
GRID = TRAINING_SIZE // 8  # the feature map's resolution (output stride 8)
BACKGROUND = len(CLASSES)  # the dense head's extra class
_RESIZE = transforms.Compose([transforms.Resize((TRAINING_SIZE, TRAINING_SIZE), antialias=True), transforms.PILToTensor()])


def _render(job: tuple[int, bool]) -> tuple[np.ndarray, int, np.ndarray]:
    """A scene at network size (the same resize serving applies), its label, and its box on the feature grid.

    Returned as numpy: tensors would travel between processes as file descriptors and exhaust them.
    """
    seed, clutter = job
    scene = make_scene(seed, clutter=clutter)
    width, height = scene.image.size
    x0, y0, x1, y1 = scene.box
    box_mask = np.zeros((GRID, GRID), dtype=np.bool_)
    box_mask[int(y0 * GRID / height) : math.ceil(y1 * GRID / height), int(x0 * GRID / width) : math.ceil(x1 * GRID / width)] = True
    return _RESIZE(scene.image.convert("RGB")).numpy(), scene.label, box_mask


def render_pool(seeds: range, clutter: bool, processes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        jobs = [(seed, clutter) for seed in seeds]
        desc = "scenes" if clutter else "easy scenes"
        rendered = list(tqdm(pool.imap(_render, jobs, chunksize=64), total=len(jobs), desc=desc, unit="img"))
    images = torch.from_numpy(np.stack([r[0] for r in rendered]))
    labels = torch.tensor([r[1] for r in rendered])
    dense = torch.from_numpy(np.stack([r[2] for r in rendered]))
    # Dense target: the object's class inside its box, background elsewhere.
    dense_targets = torch.where(dense, labels[:, None, None], torch.full_like(labels[:, None, None], BACKGROUND))
    return images, labels, dense_targets


def augment(images: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips and quarter turns, applied alike to images and dense targets: every class is symmetric under them."""
    if torch.rand(()) < 0.5:
        images, dense = images.flip(3), dense.flip(2)
    if torch.rand(()) < 0.5:
        images, dense = images.flip(2), dense.flip(1)
    turns = int(torch.randint(0, 4, ()))
    return images.rot90(turns, dims=(2, 3)), dense.rot90(turns, dims=(1, 2))


def dense_logits(model: ShapesNet, features: torch.Tensor) -> torch.Tensor:
    """Per-location class logits (the class activation maps) plus a constant 0 background logit: (B, 7, h, w)."""
    class_maps = F.conv2d(features, model.fc.weight[:, :, None, None], model.fc.bias)
    return torch.cat([class_maps, torch.zeros_like(class_maps[:, :1])], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=24_000, help="cluttered training scenes")
    parser.add_argument("--easy-scenes", type=int, default=6_000, help="plain-background scenes for the curriculum")
    parser.add_argument("--steps", type=int, default=5_000)
    parser.add_argument("--easy-fraction", type=float, default=0.15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--dense-weight", type=float, default=2.0)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 even where bfloat16 is native")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args()

    torch.manual_seed(0)
    started = time.time()
    processes = max(1, torch.get_num_threads())
    hard = render_pool(TRAIN_SEEDS[: args.scenes], clutter=True, processes=processes)
    easy = render_pool(TRAIN_SEEDS[args.scenes : args.scenes + args.easy_scenes], clutter=False, processes=processes)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    model = ShapesNet(num_classes=len(CLASSES)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps)
    class_loss = nn.CrossEntropyLoss(label_smoothing=0.05)

    # bfloat16 halves a step's time where the CPU computes it natively (AVX512-BF16, AMX); elsewhere it would be
    # emulated and slower, so float32 stays.
    bf16 = args.bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    print(f"training in {'bfloat16' if bf16 else 'float32'} on {torch.get_num_threads()} thread(s)")
    model.train()
    correct = seen = 0
    progress = tqdm(range(args.steps), desc="training", unit="step")
    for step in progress:
        images, labels, dense_targets = easy if step < args.easy_fraction * args.steps else hard
        index = torch.randint(0, len(labels), (args.batch_size,))
        batch, dense = augment(images[index], dense_targets[index])
        batch = batch.float().sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = model.features(batch)
            logits = model.fc(model.avgpool(features).flatten(1))
            loss = class_loss(logits, labels[index]) + args.dense_weight * F.cross_entropy(dense_logits(model, features), dense)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        correct += int((logits.argmax(1) == labels[index]).sum())
        seen += args.batch_size
        if step % 50 == 49:
            progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
            correct = seen = 0

    args.output_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(memory_format=torch.contiguous_format).eval()
    torch.save(model.state_dict(), args.output_dir / "shapes_net.pt")
    labels_json = {str(i): name for i, name in enumerate(CLASSES)}
    (args.output_dir / "index_to_name.json").write_text(json.dumps(labels_json, indent=2) + "\n")
    print(f"wrote {args.output_dir} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
