"""The recognizer's decision and its per-project thresholds: pure, no broker, no database."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from visionloop.contracts import UnrecognizedReason
from visionloop.services.recognizer.config import RecognizerSettings, Thresholds
from visionloop.services.recognizer.decide import Found, agreement, image_uncertainty, recognize

T = Thresholds(conf_threshold=0.6, uncertain_low=0.3)


def box(score: float, cls: str = "car", x: float = 0.0) -> Found:
    return Found(x, 0.0, x + 10.0, 10.0, cls, score)


def test_no_model() -> None:
    verdict = recognize(None, T)
    assert not verdict.recognized and verdict.reason == UnrecognizedReason.NO_MODEL
    assert verdict.uncertainty == 1.0 and verdict.found == ()


def test_confident_boxes_and_nothing_in_the_band_is_recognized() -> None:
    verdict = recognize([box(0.9), box(0.7, "bus", 20), box(0.1, "bus", 40)], T)  # 0.1 is noise
    assert verdict.recognized and verdict.reason is None
    assert [f.score for f in verdict.prelabels] == [0.9, 0.7]
    assert verdict.uncertainty == pytest.approx(0.3)  # 1 - least confident kept box
    assert verdict.uncertainty <= 1 - T.conf_threshold


def test_nothing_found_or_nothing_confident() -> None:
    empty = recognize([], T)
    assert empty.reason == UnrecognizedReason.NO_CONFIDENT_DETECTION and empty.uncertainty == 1.0
    assert "no object scoring at least 0.60" in empty.message
    weak = recognize([box(0.5), box(0.2)], T)
    assert weak.reason == UnrecognizedReason.NO_CONFIDENT_DETECTION
    assert weak.uncertainty == pytest.approx(0.5) and [f.score for f in weak.found] == [0.5]
    assert "best box scored 0.50" in weak.message


def test_confident_plus_band_is_uncertain() -> None:
    verdict = recognize([box(0.95), box(0.45, "bus", 30)], T)
    assert verdict.reason == UnrecognizedReason.UNCERTAIN and not verdict.recognized
    assert verdict.uncertainty == pytest.approx(0.55)
    assert len(verdict.found) == 2 and verdict.prelabels == ()
    assert "bus at 0.45" in verdict.message


def test_band_edges() -> None:
    assert recognize([box(0.6)], T).recognized  # conf_threshold itself is confident
    assert recognize([box(0.6), box(0.3)], T).recognized  # uncertain_low itself is noise (strict)
    assert recognize([box(0.6), box(0.3001)], T).reason == UnrecognizedReason.UNCERTAIN


def test_uncertainty_and_agreement() -> None:
    assert image_uncertainty([]) == 1.0
    assert image_uncertainty([0.9, 0.4]) == pytest.approx(0.6)
    a = [box(0.9, "car", 0), box(0.8, "bus", 50)]
    assert agreement(a, a) == 1.0
    assert agreement(a, [box(0.9, "car", 1)]) == 0.5
    assert agreement(a, [box(0.9, "bus", 0)]) == 0.0  # right place, wrong class
    assert agreement([], []) == 1.0


def test_thresholds_per_project() -> None:
    config = RecognizerSettings(conf_threshold=0.5, projects={"strict": {"conf_threshold": 0.8, "uncertain_low": 0.4}})
    assert config.thresholds("any").conf_threshold == 0.5
    strict = config.thresholds("strict")
    assert (strict.conf_threshold, strict.uncertain_low, strict.iou_threshold) == (0.8, 0.4, 0.7)
    with pytest.raises(ValidationError):
        Thresholds(conf_threshold=0.3, uncertain_low=0.5)
    with pytest.raises(ValidationError):
        RecognizerSettings(projects={"x": {"conf_threshold": 0.1, "uncertain_low": 0.2}}).thresholds("x")
