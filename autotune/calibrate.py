"""``autotune calibrate``: fit the built-in model's constants to a study's real measurements.

Every measured load point of the study (typically from the ``trtllm`` runner on the node) is
predicted by the sim runner with candidate constants; the fit minimises, in log space, the
relative error of output throughput, mean TTFT and mean TPOT (robust to outliers: soft-L1 loss),
with a weak pull of each constant towards its starting value so that constants the data cannot
see stay where they were. A fixed quarter of the configurations (by a hash of the config) is held
out of the fit, and the error is reported before and after on both parts.

scipy's ``least_squares`` does the fitting (the ``calibrate`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from autotune.config import EngineConfig, stable_hash
from autotune.errors import TrialFailure, UserError, install_hint
from autotune.measurement import LoadPoint, Status
from autotune.model import Calibration, Simulator
from autotune.scenario import Scenario
from autotune.specs import Workload

#: What is compared at every load point: (name, how to read it from a LoadPoint).
METRICS: tuple[tuple[str, Callable[[LoadPoint], float]], ...] = (
    ("output_tok_s", lambda p: p.output_throughput),
    ("ttft_mean_ms", lambda p: p.latency("ttft", "mean")),
    ("tpot_mean_ms", lambda p: p.latency("tpot", "mean")),
)
#: Bounds of each constant, as factors of its starting value (log space).
FACTOR_BOUNDS = (1 / 4, 4.0)
#: Efficiencies are fractions of a datasheet peak: never above 1.
FRACTIONS = ("gemm_eff", "mem_eff", "attn_eff", "ar_bw_eff")
#: Weight of the pull towards the starting constants (per constant, in log units).
PRIOR_WEIGHT = 0.02


def require_scipy():
    try:
        from scipy.optimize import least_squares
    except ImportError:
        raise UserError(f"autotune calibrate needs scipy: {install_hint('calibrate')}") from None
    return least_squares


@dataclass(frozen=True)
class Observation:
    """One measured configuration and its load points."""

    config: EngineConfig
    workload: Workload
    points: tuple[LoadPoint, ...]

    @property
    def held_out(self) -> bool:
        """A fixed quarter of configurations never takes part in the fit."""
        return int(stable_hash(self.config.to_dict()), 16) % 4 == 0


@dataclass(frozen=True)
class Errors:
    """Mean absolute percentage error per metric, and over all of them."""

    by_metric: dict[str, float]
    points: int

    @property
    def overall(self) -> float:
        values = [v for v in self.by_metric.values() if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    def to_dict(self) -> dict:
        return {"mape": self.overall, "by_metric": self.by_metric, "points": self.points}


@dataclass(frozen=True)
class CalibrationResult:
    before: Calibration
    after: Calibration
    fit_before: Errors
    fit_after: Errors
    held_before: Errors | None
    held_after: Errors | None
    fitted: int  # configurations in the fit
    held: int  # configurations held out
    evaluations: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "before": self.before.to_dict(), "after": self.after.to_dict(),
            "fit": {"configs": self.fitted, "before": self.fit_before.to_dict(),
                    "after": self.fit_after.to_dict()},
            "held_out": None if self.held_before is None else {
                "configs": self.held, "before": self.held_before.to_dict(),
                "after": self.held_after.to_dict()},
            "evaluations": self.evaluations, "notes": list(self.notes),
        }


def predict(scenario: Scenario, calibration: Calibration, obs: Observation
            ) -> tuple[LoadPoint, ...] | None:
    """The sim's load points for ``obs`` under ``calibration`` (None: the model says it can't
    run, which the fit treats as a large error)."""
    try:
        m = Simulator(scenario.model, scenario.gpu, calibration).measure(
            obs.config, obs.workload, [p.concurrency for p in obs.points])
    except TrialFailure:
        return None
    return m.load_points


def errors(scenario: Scenario, calibration: Calibration, observations: Sequence[Observation]
           ) -> Errors:
    per: dict[str, list[float]] = {name: [] for name, _ in METRICS}
    n = 0
    for obs in observations:
        pred = predict(scenario, calibration, obs)
        for i, real in enumerate(obs.points):
            n += 1
            for name, read in METRICS:
                truth = read(real)
                if not truth or math.isnan(truth):
                    continue
                got = read(pred[i]) if pred is not None else float("inf")
                per[name].append(min(abs(got - truth) / truth, 10.0))
    return Errors({k: float(np.mean(v)) if v else float("nan") for k, v in per.items()}, n)


def fit(scenario: Scenario, observations: Sequence[Observation], start: Calibration,
        progress: Callable[[int], None] | None = None, max_evaluations: int = 400
        ) -> CalibrationResult:
    """Fit ``start``'s constants to the observations not held out (see the module docstring)."""
    least_squares = require_scipy()
    train = [o for o in observations if not o.held_out]
    held = [o for o in observations if o.held_out]
    notes = []
    if len(train) < 2:
        # Too few to hold any out: fit on everything and say so.
        train, held = list(observations), []
        notes.append("fewer than 3 configurations: no held-out check")
    if not train:
        raise UserError("the study has no measured configurations to calibrate on")
    names = list(start.to_dict())
    x0 = np.log([start.to_dict()[n] for n in names])
    lo = x0 + math.log(FACTOR_BOUNDS[0])
    hi = x0 + math.log(FACTOR_BOUNDS[1])
    for i, n in enumerate(names):
        if n in FRACTIONS:
            hi[i] = min(hi[i], 0.0)  # log(1)
            lo[i] = min(lo[i], hi[i] - 1e-6)
    x0 = np.clip(x0, lo, hi)
    targets = [[read(p) for p in o.points for _, read in METRICS] for o in train]
    evaluations = 0

    def calibration_of(x: np.ndarray) -> Calibration:
        return Calibration.from_dict(dict(zip(names, np.exp(x))))

    def residuals(x: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += 1
        if progress is not None:
            progress(evaluations)
        cal = calibration_of(x)
        out = []
        for obs, truth in zip(train, targets):
            pred = predict(scenario, cal, obs)
            got = ([read(p) for p in pred for _, read in METRICS] if pred is not None
                   else [None] * len(truth))
            for g, t in zip(got, truth):
                if not t or math.isnan(t):
                    out.append(0.0)
                else:
                    out.append(math.log(g / t) if g and g > 0 else 3.0)
        out.extend(PRIOR_WEIGHT * (x - x0))
        return np.asarray(out)

    # Finite differences of a simulation: a step of ~2% in each log-constant is well above the
    # simulation's own granularity (integer requests and tokens).
    sol = least_squares(residuals, x0, bounds=(lo, hi), loss="soft_l1", f_scale=0.1,
                        diff_step=0.02, x_scale=1.0, max_nfev=max_evaluations)
    after = calibration_of(sol.x)
    return CalibrationResult(
        before=start, after=after,
        fit_before=errors(scenario, start, train), fit_after=errors(scenario, after, train),
        held_before=errors(scenario, start, held) if held else None,
        held_after=errors(scenario, after, held) if held else None,
        fitted=len(train), held=len(held), evaluations=evaluations, notes=tuple(notes))


def observations_of(measurements) -> list[Observation]:
    """The measured configurations of a study (``Store.measurements``), one per config."""
    seen, out = set(), []
    for m in measurements:
        if m.status != Status.OK or not m.load_points or m.key in seen:
            continue
        seen.add(m.key)
        points = tuple(p for p in m.load_points if p.output_throughput > 0)
        if points:
            out.append(Observation(m.config, m.workload, points))
    return out


__all__ = ["CalibrationResult", "Errors", "Observation", "errors", "fit", "observations_of",
           "predict", "require_scipy"]
