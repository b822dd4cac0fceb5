"""`visionloop bench loop --dataset DIR --json` on a YOLO folder made by hand (not by `demo world
export`): every arm runs on the folder's images and classes, and the JSON line holds the figures
the protocol promises. The smallest shape that still has three rounds and trains: its figures say
nothing; that the command runs a user's folder end to end is the point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

NAMES = ["bolt", "nut", "washer"]
KEYS = ("world", "seeds", "arms", "effort_reduction_mean", "effort_reduction_ci95", "assisted_effort_reduction_mean",
        "map50_95_diff_mean", "map50_95_diff_ci95", "auto_accept_precision_lower95", "auto_accepted_object_recall",
        "baseline_no_learning_map50_95", "cost_grid", "wall_s")


def _hand_made_yolo(root: Path, count: int) -> Path:
    """A YOLO folder drawn with PIL: grey parts on a textured bench, one label line per part."""
    import random

    rng = random.Random(5)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    for n in range(count):
        split = "val" if n % 5 == 0 else "train"
        image = Image.new("RGB", (192, 144), (rng.randrange(90, 140),) * 3)
        draw = ImageDraw.Draw(image)
        for _ in range(40):  # texture: a bench is not a flat colour
            x, y = rng.randrange(192), rng.randrange(144)
            draw.line((x, y, x + rng.randrange(-20, 20), y + rng.randrange(-20, 20)), fill=(rng.randrange(60, 180),) * 3)
        lines = []
        for _ in range(rng.randint(1, 3)):
            cls = rng.randrange(3)
            w, h = rng.randrange(28, 60), rng.randrange(28, 60)
            x, y = rng.randrange(0, 192 - w), rng.randrange(0, 144 - h)
            fill = (30 + 60 * cls,) * 3
            if cls == 0:
                draw.rectangle((x, y, x + w, y + h), fill=fill)
            elif cls == 1:
                w = h = min(w, h)
                draw.regular_polygon(((x + w / 2, y + h / 2), w / 2), 6, fill=fill)
            else:
                draw.ellipse((x, y, x + w, y + h), fill=fill)
            lines.append(f"{cls} {(x + w / 2) / 192:.6f} {(y + h / 2) / 144:.6f} {w / 192:.6f} {h / 144:.6f}")
        image.save(root / "images" / split / f"part_{n:03d}.jpg", quality=90)
        (root / "labels" / split / f"part_{n:03d}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [bolt, nut, washer]\n")
    return root


@pytest.mark.long
@pytest.mark.timeout(2400)
def test_bench_loop_runs_every_arm_on_a_hand_made_yolo_folder(tmp_path: Path) -> None:
    dataset = _hand_made_yolo(tmp_path / "my parts", 70)
    run = subprocess.run(
        [sys.executable, "-m", "visionloop.cli", "bench", "loop", "--quick", "--dataset", str(dataset), "--rounds", "16,8,6",
         "--epochs", "1", "--finetune-epochs", "1", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=2340, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    missing = [k for k in KEYS if k not in result]
    assert not missing, missing
    assert result["world"] == str(dataset) and result["arms"] == ["manual", "assisted", "loop"] and result["seeds"] == 1
    assert result["settings"]["epochs"] == 1 and result["settings"]["rounds"] == [16, 8, 6]
    assert len(result["runs"]) == 3 and all(len(r["map50_95_by_round"]) == 3 for r in result["runs"])
    assert all(r["images_by_round"][0] > 0 for r in result["runs"])  # the folder's images went through every arm
    assert len(result["cost_grid"]) == 36
