"""The measurement protocol: how one configuration is measured and what the trial concludes.

A runner measures a configuration at one load per run. The protocol walks (cheap runner) or
bisects (costly runner) the load ladder, pins the operating point between two rungs, and turns
the load points into an ``Outcome``: the highest-throughput load meeting the SLO, the objective
(output tok/s per GPU there) and one constraint value per SLO term (<= 0: met) plus ``fits``.

No Optuna and no database here: the study (``study.py``), the model's prior (``strategy.py``) and
the benchmarks all call ``evaluate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from autotune.config import EngineConfig
from autotune.errors import Interrupted, PredictedOutOfMemory, TrialFailure
from autotune.measurement import MAX_CONCURRENCY, LoadPoint, Measurement, Status, replica_load
from autotune.slo import FITS, SLO
from autotune.specs import Workload


class Measurer(Protocol):
    """What the protocol measures with: a runner (``autotune.runners.Runner``) or the model
    itself (``autotune.model.Simulator``). ``expensive``: every run costs real time."""

    expensive: bool

    def measure(self, config: EngineConfig, workload: Workload, loads: Sequence[int]
                ) -> Measurement: ...


@dataclass(frozen=True)
class Outcome:
    """What one trial concluded about one configuration."""

    status: Status  # OK, INFEASIBLE, PREDICTED, FAILED or INTERRUPTED
    load_points: tuple[LoadPoint, ...] = ()
    point: LoadPoint | None = None  # operating point when feasible, else the closest point
    feasible: bool = False
    objective: float = 0.0  # output tok/s per GPU at ``point`` (0 when nothing ran)
    constraints: dict[str, float] = field(default_factory=dict)
    max_requests_in_flight: int | None = None
    failure: TrialFailure | None = None
    raw: dict = field(default_factory=dict)  # runner records per load (reports, logs)


def operating_point(points: Sequence[LoadPoint], slo: SLO) -> tuple[LoadPoint | None, bool]:
    """The highest-throughput point meeting ``slo`` (feasible=True), else the one that misses it
    by the least (its worst term's relative excess is smallest)."""
    if not points:
        return None, False
    meeting = [p for p in points if slo.met(p)]
    if meeting:
        # Ties go to the higher load: the same throughput with more requests in flight (the
        # engine, not the load, was the limit) is the truer operating point.
        return max(meeting, key=lambda p: (p.output_throughput_per_gpu, p.concurrency)), True
    return min(points, key=lambda p: max(slo.violations(p).values())), False


def outcome_of(points: Sequence[LoadPoint], slo: SLO, max_in_flight: int | None,
               raw: dict | None = None) -> Outcome:
    """The outcome of measured ``points``: the operating point, objective and constraints."""
    point, feasible = operating_point(points, slo)
    constraints = {FITS: 0.0, **slo.violations(point)}
    return Outcome(status=Status.OK, load_points=tuple(points), point=point, feasible=feasible,
                   objective=point.output_throughput_per_gpu, constraints=constraints,
                   max_requests_in_flight=max_in_flight, raw=raw or {})


def failed_outcome(failure: TrialFailure, slo: SLO) -> Outcome:
    """The outcome of a configuration that could not be measured (every constraint missed)."""
    if isinstance(failure, PredictedOutOfMemory):
        status = Status.PREDICTED
    elif failure.infeasible:
        status = Status.INFEASIBLE
    elif isinstance(failure, Interrupted):
        status = Status.INTERRUPTED
    else:
        status = Status.FAILED
    return Outcome(status=status, constraints={FITS: 1.0, **{b.name: 1.0 for b in slo.bounds}},
                   failure=failure)


@dataclass(frozen=True)
class Sweep:
    """The load points one trial measured (ascending load, "max" last), the requests that fit in
    flight, and each run's runner-specific record (reports, logs) keyed by its load."""

    points: tuple[LoadPoint, ...]
    capacity: int | None
    raw: dict[str, dict] = field(default_factory=dict)


class _Runs:
    """Runs one load at a time and keeps what a sweep returns."""

    def __init__(self, runner: Measurer, config: EngineConfig, workload: Workload):
        self.runner, self.config, self.workload = runner, config, workload
        self.points: dict[int, LoadPoint] = {}
        self.raw: dict[str, dict] = {}
        self.capacity: int | None = None

    def run(self, load: int) -> LoadPoint:
        m: Measurement = self.runner.measure(self.config, self.workload, [load])
        point = m.load_points[-1]
        self.points[load] = point
        if m.raw:
            self.raw[str(load)] = m.raw
        self.capacity = self.capacity or m.max_requests_in_flight or None
        return point

    def sweep(self) -> Sweep:
        ordered = sorted(self.points.values(),
                         key=lambda p: (p.concurrency == MAX_CONCURRENCY, p.concurrency))
        return Sweep(tuple(ordered), self.capacity, self.raw)


#: How finely a trial pins its operating point between two rungs of the load ladder: it halves
#: the gap between the highest load meeting the SLO and the next rung (which misses it) until
#: the gap is at most this share of the load (or one request per replica). A power-of-two ladder
#: alone can report half of what a configuration sustains, and makes configurations that differ
#: by a hair at the SLO's edge look 2x apart; three more runs (8 -> 16: 12, 14, 15) fix both.
REFINE_RESOLUTION = 0.125


def _refine(runs: _Runs, slo: SLO) -> None:
    """Bisect the loads between the highest measured load meeting ``slo`` and the lowest
    higher one missing it (both numeric; "max" is not a load to bisect towards)."""
    if not slo:
        return
    met = {c: slo.met(p) for c, p in runs.points.items() if c != MAX_CONCURRENCY}
    good = max((c for c, ok in met.items() if ok), default=None)
    bad = min((c for c, ok in met.items() if not ok and good is not None and c > good),
              default=None)
    if good is None or bad is None:
        return
    if runs.capacity:  # loads above what fits in flight at once behave like "max"
        bad = min(bad, runs.capacity + 1)
    # Loads are split evenly over the dp replicas (rounded up), so only multiples of dp differ.
    step = runs.config.dp
    while bad - good > max(step, int(good * REFINE_RESOLUTION)):
        mid = (good + bad) // 2 // step * step
        if mid <= good:
            break
        if slo.met(runs.run(mid)):
            good = mid
        else:
            bad = mid


def _ascending(ladder: Sequence[int], dp: int = 1) -> list[int]:
    """The ladder's loads, ascending, "max" last, each the total that is really in flight: the
    load is split evenly over the ``dp`` replicas (rounded up), so only multiples of dp differ
    (on 8 replicas, loads 1 to 8 all put one request on each)."""
    finite = sorted({replica_load(c, dp) * dp for c in ladder if c != MAX_CONCURRENCY})
    return finite + ([MAX_CONCURRENCY] if MAX_CONCURRENCY in ladder else [])


def measure_ladder(runner: Measurer, config: EngineConfig, workload: Workload,
                   ladder: Sequence[int], slo: SLO) -> Sweep:
    """Measure ``config`` up the load ladder (ascending, then "max"), one load per run.

    Stops at the first load that misses the SLO: latency only grows with load, so higher loads
    would miss it too. Loads above what the KV cache holds at once behave like "max" and are
    skipped.
    """
    runs = _Runs(runner, config, workload)
    for load in _ascending(ladder, config.dp):
        if runs.capacity and load != MAX_CONCURRENCY and load > runs.capacity:
            continue
        point = runs.run(load)
        if slo and not slo.met(point):
            break
    _refine(runs, slo)
    return runs.sweep()


def bisect_ladder(runner: Measurer, config: EngineConfig, workload: Workload,
                  ladder: Sequence[int], slo: SLO) -> Sweep:
    """Find the operating point with as few runs as possible (for runners whose every run is
    costly): the same answer as ``measure_ladder`` when latency and throughput grow with load.

    Without an SLO the top of the ladder is the answer (one run). With one: the lowest load
    first (if it misses, nothing will meet the SLO), then the top, then bisection between the
    highest load known to meet the SLO and the lowest known to miss it.
    """
    runs = _Runs(runner, config, workload)
    loads = _ascending(ladder, config.dp)

    def meets(load: int) -> bool:
        nonlocal loads
        met = slo.met(runs.run(load))
        if runs.capacity:
            # Loads beyond what the KV cache holds at once behave like "max". (The bisection
            # below works on load values, so a ladder that shrinks here stays consistent.)
            loads = [c for c in loads if c == MAX_CONCURRENCY or c <= runs.capacity or c == load]
        return met

    def rank(load: int) -> float:
        return math.inf if load == MAX_CONCURRENCY else load

    if not slo:
        meets(loads[-1])
        return runs.sweep()
    if not meets(loads[0]):
        return runs.sweep()
    # The highest load known to meet the SLO, and the lowest known to miss it (None: none).
    good, bad = loads[0], None
    if len(loads) > 1:
        top = loads[-1]
        if meets(top):
            good = top
        else:
            bad = top
    while True:
        between = [c for c in loads
                   if rank(good) < rank(c) and (bad is None or rank(c) < rank(bad))]
        if not between:
            break
        mid = between[(len(between) - 1) // 2]
        if meets(mid):
            good = mid
        else:
            bad = mid
    _refine(runs, slo)
    return runs.sweep()


#: ``gate(config)`` raises a TrialFailure for a config that must not be run at all.
Gate = Callable[[EngineConfig], None]


def sweep_ladder(runner: Measurer, config: EngineConfig, workload: Workload,
                 ladder: Sequence[int], slo: SLO) -> Sweep:
    """The runner's load points for ``config``: bisection for a runner whose every run is costly
    (a real engine), the whole walk up the ladder for a cheap one, which keeps the whole load
    curve for the Pareto front and the report."""
    sweep = bisect_ladder if runner.expensive else measure_ladder
    return sweep(runner, config, workload, ladder, slo)


def evaluate(runner: Measurer, config: EngineConfig, workload: Workload, ladder: Sequence[int],
             slo: SLO, *, gate: Gate | None = None) -> Outcome:
    """Measure ``config`` with ``runner`` and conclude: the trial's whole protocol.

    ``gate`` runs first (a prediction that rules out what cannot run at all). A failure of the
    gate or of the runner becomes a failed ``Outcome`` with its class; KeyboardInterrupt passes.
    """
    try:
        if gate is not None:
            gate(config)
        swept = sweep_ladder(runner, config, workload, ladder, slo)
    except TrialFailure as failure:
        return failed_outcome(failure, slo)
    return outcome_of(swept.points, slo, swept.capacity, swept.raw)


__all__ = [
    "FITS", "REFINE_RESOLUTION", "Gate", "Measurer", "Outcome", "Sweep", "bisect_ladder",
    "evaluate",
    "failed_outcome", "measure_ladder", "operating_point", "outcome_of", "sweep_ladder",
]
