"""What the demo and the chaos bench share: the size of the world they stream, the defects mixed
into it, the training and the fleet. `DemoConfig` (demo/scenario.py) and `ChaosConfig`
(bench/chaos/config.py) extend it; each sets its own defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorldSize:
    """Sizes and rates of a scripted run (the demo's defaults)."""

    seed: int = 7
    rounds: tuple[int, ...] = (200, 150, 150)
    """Images submitted per round (the third, if any, adds a class)."""
    waves: int = 3
    """Each round's images arrive in this many waves; people work each wave before the next comes
    (so calibration learned from the first wave's reviews can auto-accept the next wave's pre-labels)."""
    test_images: int = 48
    new_class_test_images: int = 16
    width: int = 192
    height: int = 144
    objects: tuple[int, int] = (1, 3)
    size: tuple[float, float] | None = None
    """Object sides as fractions of the shorter image side; None: the world's own."""
    imgsz: int = 160
    epochs: int = 40
    finetune_epochs: int = 20
    batch: int = 16
    agents: int = 5
    exact_dup_rate: float = 0.05
    near_dup_rate: float = 0.05
    low_res_rate: float = 0.03
    corrupt_rate: float = 0.03
