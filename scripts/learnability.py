"""How fast a small YOLO learns a built-in world from scratch (the learnability check in docs/benchmarks.md).

    python scripts/learnability.py photo 400 30 160          # world, training scenes, epochs, imgsz
    SIZE=0.2,0.5 python scripts/learnability.py photo 400 30 160

Renders `n` training scenes and 100 held-out ones (192 x 144, 1-3 objects, the world's first
three classes), trains `yolo11n.yaml` from scratch on the CPU and prints the held-out mAP50-95.
Offline: it sets YOLO_OFFLINE and a private YOLO_CONFIG_DIR with a font from matplotlib.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(style: str, n: int, epochs: int, imgsz: int) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"vl-learn-{style}-"))
    os.environ.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0", YOLO_CONFIG_DIR=str(root / "ycfg"))
    import matplotlib

    (root / "ycfg" / "Ultralytics").mkdir(parents=True)
    shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", root / "ycfg" / "Ultralytics" / "Arial.ttf")
    from visionloop.contracts import Box
    from visionloop.libs.formats import LabelledImage, write_yolo
    from visionloop.libs.scenes import PHOTO_SIZE, STYLE_CLASSES, render_world_scene

    classes = STYLE_CLASSES[style][:3]
    size = tuple(map(float, os.environ["SIZE"].split(","))) if os.environ.get("SIZE") else (PHOTO_SIZE if style == "photo" else (0.22, 0.45))
    images, data = [], {}
    for i in range(n + 100):
        scene = render_world_scene(style, 10_000 + i, width=192, height=144, classes=classes, objects=(1, 3), size=size)
        name = f"s{i:05d}.jpg"
        data[name] = scene.encode()
        boxes = tuple(Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in scene.boxes)
        images.append(LabelledImage(file_name=name, width=192, height=144, split="train" if i < n else "val", boxes=boxes))
    data_yaml = write_yolo(root / "data", images, list(classes), image_bytes=lambda image: data[image.file_name])
    from ultralytics import YOLO

    started = time.time()
    model = YOLO("yolo11n.yaml")
    model.train(data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=16, device="cpu", workers=0, plots=False, verbose=False,
                project=str(root / "runs"), name="t", exist_ok=True, patience=100)
    result = model.val(data=str(data_yaml), imgsz=imgsz, split="val", plots=False, verbose=False)
    print(f"RESULT {style} n={n} epochs={epochs} imgsz={imgsz} size={size}: mAP50-95 {result.box.map:.3f} "
          f"mAP50 {result.box.map50:.3f} train_s {time.time() - started:.0f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
