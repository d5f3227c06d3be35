"""The search of ``benchmarks/calibrate.py`` (``lm_fit``) on problems with a known optimum."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import calibrate  # noqa: E402  (benchmarks/ is not a package)


def test_a_constant_on_its_bound_does_not_stop_the_others_from_moving():
    # Three residuals over two constants; the box holds the second at >= 0, and the
    # unconstrained optimum (t1 < 0) lies outside it: the best inside is t0 = 1, t1 = 0.
    # Starting on that bound, with the gradient pushing t1 further out, the fit keeps t1 on
    # it and still moves t0 to its best value there.
    def at(t):
        return np.array([t[0] + 3 * t[1] - 1, 2 * (t[1] + 1), t[0] - 1])

    lo, hi = np.array([-5.0, 0.0]), np.array([5.0, 5.0])
    theta, res = calibrate.lm_fit(np.array([-2.0, 0.0]), lo, hi, at, iterations=30)
    assert theta[1] == 0.0
    assert abs(theta[0] - 1) < 1e-3
    assert np.allclose(res, at(theta))


def test_steps_are_capped_and_stay_within_the_bounds():
    # One residual whose optimum is far away (log-space 8): each step moves at most
    # MAX_LOG_STEP, and the fit stops at the upper bound.
    seen = []

    def at(t):
        seen.append(t.copy())
        return np.array([t[0] - 8.0])

    theta, _ = calibrate.lm_fit(np.array([0.0]), np.array([-1.0]), np.array([3.0]), at,
                                iterations=10)
    assert theta[0] == 3.0
    assert all(-1.0 <= s[0] <= 3.0 for s in seen)
    # every point tried is a capped step (or a finite-difference probe) from the one before
    moves = np.abs(np.diff([s[0] for s in seen]))
    assert moves.max() <= calibrate.MAX_LOG_STEP + calibrate.FD_STEP + 1e-9
    assert len(seen) > 6  # it got there in several steps, not one


def test_a_plain_start_name_stands_for_all_its_variants_and_unknown_names_are_refused():
    starts = calibrate.parse_starts(["mem_eff=0.9", "layer_overhead_us@trt=4", "ar_latency_us=8"])
    assert starts["mem_eff@fp8"] == starts["mem_eff@bf16"] == 0.9
    assert starts["layer_overhead_us@trt"] == 4.0 and "layer_overhead_us@pytorch" not in starts
    assert starts["ar_latency_us"] == 8.0
    for bad in (["mem_eff"], ["no_such_constant=1"], ["mem_eff@fp3=0.9"], ["gemm_eff=fast"]):
        with pytest.raises(ValueError):
            calibrate.parse_starts(bad)
    # an engine owns its runtime's costs, not the GPU's efficiencies
    assert calibrate.parse_starts(["layer_overhead_us=30"], engine=True) == {
        "layer_overhead_us": 30.0}
    with pytest.raises(ValueError, match="--start"):
        calibrate.parse_starts(["mem_eff=0.9"], engine=True)
