"""libs/yolo.py: Ultralytics set up for a machine without internet, and the dataset writer."""

from __future__ import annotations

import os

from PIL import Image

from visionloop.libs import yolo


def test_configure_makes_a_private_offline_config(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    for name in ("YOLO_CONFIG_DIR", "YOLO_OFFLINE", "YOLO_AUTOINSTALL"):
        monkeypatch.delenv(name, raising=False)
    folder = yolo.configure(tmp_path / "state")
    assert folder == (tmp_path / "state" / "ultralytics").resolve()
    assert os.environ["YOLO_CONFIG_DIR"] == str(folder)
    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "0"
    font = folder / "Ultralytics" / "Arial.ttf"
    assert font.is_file() and font.stat().st_size > 10_000  # a real TTF, never downloaded


def test_ultralytics_never_auto_installs_once_configured() -> None:
    from detector import TEST_STATE

    module = yolo.ultralytics(TEST_STATE / "ultralytics")
    from ultralytics.utils import checks

    assert module.YOLO is not None and checks.AUTOINSTALL is False


def test_write_dataset_in_yolo_format(tmp_path) -> None:  # noqa: ANN001
    image = Image.new("RGB", (200, 100))
    sample = yolo.Sample("a", image, [(10, 20, 50, 60, "square"), (100, 0, 200, 100, "circle")])
    data = yolo.write_dataset(tmp_path / "ds", [sample], [yolo.Sample("b", image, [])], ["circle", "square"])
    assert "names" in data.read_text() and (tmp_path / "ds" / "images" / "train" / "a.png").is_file()
    lines = (tmp_path / "ds" / "labels" / "train" / "a.txt").read_text().splitlines()
    assert lines == ["1 0.150000 0.400000 0.200000 0.400000", "0 0.750000 0.500000 0.500000 1.000000"]
    assert (tmp_path / "ds" / "labels" / "val" / "b.txt").read_text() == ""
