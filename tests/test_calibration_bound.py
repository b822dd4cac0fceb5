"""Auto-accept with a guarantee, pure: a class's threshold stands only where the one-sided 95 %
Clopper–Pearson lower bound of box precision reaches the target, and only on the model version
whose boxes people verified. No broker, no database."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta

from visionloop.contracts import Detection, LabelRejectReason, ModelRef
from visionloop.services.verifier.calibrate import Sample, calibrate, decide, lower_bound, model_key, model_label

STRICT = {"min_samples": 1, "min_support": 1}
"""Floors out of the way: the bound alone decides."""


def test_eight_of_eight_is_not_enough_fifty_nine_is() -> None:
    eight = calibrate("car", [Sample(0.9, True)] * 8, target=0.95, **STRICT)
    assert eight.threshold is None and eight.status == "bound_below_target"
    assert eight.lower_bound == pytest.approx(0.05 ** (1 / 8)) and eight.lower_bound == pytest.approx(0.688, abs=1e-3)
    assert (eight.precision, eight.support, eight.support_correct, eight.correct) == (1.0, 8, 8, 8)
    fifty_nine = calibrate("car", [Sample(0.9, True)] * 59, target=0.95, **STRICT)
    assert fifty_nine.status == "calibrated" and fifty_nine.threshold == 0.9
    assert fifty_nine.lower_bound == pytest.approx(0.05 ** (1 / 59)) and fifty_nine.lower_bound >= 0.95
    assert (fifty_nine.target, fifty_nine.confidence) == (0.95, 0.95)
    assert calibrate("car", [Sample(0.9, True)] * 58, target=0.95, **STRICT).threshold is None
    # the floors still hold whatever the bound says
    assert calibrate("car", [Sample(0.9, True)] * 59, target=0.95, min_samples=60, min_support=1).status == "too_few_samples"
    assert calibrate("car", [Sample(0.9, True)] * 59, target=0.95, min_samples=1, min_support=60).threshold is None


def test_the_bound_is_scipys_beta_quantile() -> None:
    assert lower_bound(0, 10) == 0.0
    assert lower_bound(7, 10) == pytest.approx(beta.ppf(0.05, 7, 4))
    assert lower_bound(7, 10, confidence=0.99) == pytest.approx(beta.ppf(0.01, 7, 4))
    with pytest.raises(ValueError, match="confidence"):
        calibrate("car", [], target=0.9, confidence=1.0, **STRICT)
    with pytest.raises(ValueError, match="target precision"):
        calibrate("car", [], target=0.0, **STRICT)
    with pytest.raises(ValueError, match="between 0 and the number"):
        lower_bound(11, 10)


def test_a_mixed_distribution_gets_the_lowest_cut_whose_bound_reaches_the_target() -> None:
    samples = (
        [Sample(0.95, True)] * 100
        + [Sample(0.85, True)] * 40 + [Sample(0.85, False)]
        + [Sample(0.7, True)] * 30 + [Sample(0.7, False)] * 5
        + [Sample(0.5, False)] * 20
    )
    cuts = {0.95: (100, 100), 0.85: (140, 141), 0.7: (170, 176), 0.5: (170, 196)}
    bounds = {t: beta.ppf(0.05, k, n - k + 1) for t, (k, n) in cuts.items()}
    assert bounds[0.95] >= 0.95 and bounds[0.85] >= 0.95 and bounds[0.7] < 0.95
    # raw precision at 0.7 (0.966) passes the target: the old rule would have auto-accepted from 0.7
    assert 170 / 176 > 0.95
    cal = calibrate("car", samples, target=0.95, min_samples=50, min_support=20)
    assert cal.status == "calibrated" and cal.threshold == 0.85
    assert (cal.support_correct, cal.support, cal.correct, cal.samples) == (140, 141, 170, 196)
    assert cal.precision == pytest.approx(140 / 141) and cal.lower_bound == pytest.approx(bounds[0.85])
    # the order of the samples does not matter
    assert calibrate("car", samples[::-1], target=0.95, min_samples=50, min_support=20) == cal
    # without a threshold the figures are those of the cut with the highest bound
    none = calibrate("car", samples, target=0.99, min_samples=50, min_support=20)
    assert none.threshold is None and none.support == 100 and none.lower_bound == pytest.approx(bounds[0.95])


def test_true_precision_085_almost_never_gets_a_threshold_at_090() -> None:
    """Loose floors (the demo's), precision 0.85 at every score: the bound refuses; raw precision did not."""
    rng = np.random.default_rng(20240605)
    bounded = raw = 0
    for _ in range(200):
        n = int(rng.integers(100, 401))
        scores, right = rng.random(n).round(4), rng.random(n) < 0.85
        samples = [Sample(float(s), bool(r)) for s, r in zip(scores, right, strict=True)]
        cal = calibrate("car", samples, target=0.9, min_samples=20, min_support=8)
        bounded += cal.threshold is not None
        order = np.argsort(-scores, kind="stable")
        precision = np.cumsum(right[order]) / np.arange(1, n + 1)
        raw += bool(np.any(precision[7:] >= 0.9))
    assert bounded < 10, f"a threshold in {bounded} of 200 runs"
    assert raw > 60, raw  # the old raw-precision rule, on the same data


def test_a_new_model_version_starts_uncalibrated() -> None:
    v3, v4 = ModelRef(model_id="demo-detector", version=3), ModelRef(model_id="demo-detector", version=4)
    assert model_key(v3) == ("demo-detector", 3) and model_key(None) == ("-", 0) and model_label(model_key(v4)) == "demo-detector@v4"
    evidence = {model_key(v3): [Sample(0.9, True)] * 80}
    rules = {"target": 0.95, "min_samples": 50, "min_support": 20}

    def calibration(model: ModelRef) -> dict:
        samples = evidence.get(model_key(model), [])
        return {"car": calibrate("car", samples, model=model_key(model), **rules)} if samples else {}

    car = [Detection(x1=0, y1=0, x2=10, y2=10, class_name="car", score=0.95)]
    kwargs = {"image_id": "a" * 64, "spot_check_rate": 0.0}
    assert decide(car, calibration(v3), model=model_key(v3), **kwargs).accepted
    # v4's pre-labels: no evidence of its own, and v3's does not vouch for it
    fresh = decide(car, calibration(v4), model=model_key(v4), **kwargs)
    assert not fresh.accepted and fresh.reason is LabelRejectReason.NEEDS_REVIEW and "demo-detector@v4" in fresh.message
    borrowed = decide(car, calibration(v3), model=model_key(v4), **kwargs)
    assert not borrowed.accepted and "not measured on this version" in borrowed.message
    # people verify v4's boxes: too few first, then enough to lift the bound
    evidence[model_key(v4)] = [Sample(0.9, True)] * 40
    thin = decide(car, calibration(v4), model=model_key(v4), **kwargs)
    assert not thin.accepted and "too few samples" in thin.message
    evidence[model_key(v4)] += [Sample(0.9, True)] * 20
    assert calibration(v4)["car"].lower_bound >= 0.95
    assert decide(car, calibration(v4), model=model_key(v4), **kwargs).accepted
