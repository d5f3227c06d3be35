"""What the study found: the best feasible configs, the closest miss, the Pareto front."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from autotune.config import EngineConfig
from autotune.db import Store, StoredMeasurement
from autotune.errors import UserError
from autotune.measurement import LoadPoint, Status, replica_load
from autotune.slo import SLO, parse_slo
from autotune.sweep import operating_point

#: Version of the ``best --json`` layout (documented in the README).
SCHEMA = "autotune.best/1"


@dataclass(frozen=True)
class SloTerm:
    """One SLO term at the operating point: measured value and margin (share of the limit left;
    negative when missed)."""

    term: str  # "tpot:p99<=25ms"
    metric: str
    stat: str
    limit_ms: float
    measured_ms: float
    margin: float
    met: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Recommendation:
    """A configuration, the load it runs at and why it qualifies."""

    config: EngineConfig
    point: LoadPoint
    terms: tuple[SloTerm, ...]
    feasible: bool
    trial_number: int
    measurement_id: int
    runner: str
    #: The runner's settings when it measured (which checkpoint it ran, for one).
    runner_settings: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def failing(self) -> list[SloTerm]:
        return [t for t in self.terms if not t.met]

    def to_dict(self) -> dict:
        p = self.point
        return {
            "config": self.config.to_dict(),
            "label": self.config.label(),
            "feasible": self.feasible,
            "trial": self.trial_number,
            "measurement_id": self.measurement_id,
            "runner": self.runner,
            "concurrency": p.concurrency,
            "concurrency_per_replica": replica_load(p.concurrency, self.config.dp),
            "throughput": {
                "output_tok_s": p.output_throughput,
                "output_tok_s_per_gpu": p.output_throughput_per_gpu,
                "output_tok_s_per_user": p.output_throughput_per_user,
                "requests_per_s": p.request_throughput,
            },
            "latency_ms": p.latency_ms,
            "slo": [t.to_dict() for t in self.terms],
        }


def slo_terms(slo: SLO, point: LoadPoint) -> tuple[SloTerm, ...]:
    out = []
    for b in slo.bounds:
        value = b.measured(point)
        out.append(SloTerm(term=str(b), metric=b.metric, stat=b.stat, limit_ms=b.limit_ms,
                           measured_ms=value, margin=(b.limit_ms - value) / b.limit_ms,
                           met=b.violation(point) <= 0))
    return tuple(out)


@dataclass(frozen=True)
class FrontPoint:
    """One measured load point on the Pareto front, and whether it meets the study's SLO."""

    config: EngineConfig
    point: LoadPoint
    slo_met: bool
    trial_number: int
    measurement_id: int

    def to_dict(self) -> dict:
        p = self.point
        return {"config": self.config.to_dict(), "label": self.config.label(),
                "trial": self.trial_number, "concurrency": p.concurrency,
                "output_tok_s_per_gpu": p.output_throughput_per_gpu,
                "output_tok_s_per_user": p.output_throughput_per_user, "slo_met": self.slo_met}


class Results:
    """A study's measurements, read once, and the answers ``best`` gives from them."""

    def __init__(self, store: Store, study_name: str):
        row = store.study(study_name)
        if row is None:
            names = store.study_names()
            hint = f"; studies here: {', '.join(names)}" if names else ""
            raise UserError(f"no study named {study_name!r} in this database{hint}")
        self.study_name = study_name
        self.scenario: dict = row.scenario
        self.space: dict = row.space or {}
        self.versions: dict = row.versions or {}
        self.created_at = row.created_at
        self.slo = parse_slo(self.scenario.get("slo") or None)
        self.measurements = store.measurements(study_name)
        # Reused rows carry no load points of their own: each config counts once.
        self.measured = [m for m in self.measurements if m.status == Status.OK and m.load_points]

    def _recommend(self, m: StoredMeasurement) -> Recommendation:
        point, feasible = operating_point(m.load_points, self.slo)
        return Recommendation(config=m.config, point=point, terms=slo_terms(self.slo, point),
                              feasible=feasible, trial_number=m.trial_number,
                              measurement_id=m.id, runner=m.runner,
                              runner_settings=m.runner_settings or {})

    def best(self, top: int = 1) -> list[Recommendation]:
        """The ``top`` feasible configs by output tok/s per GPU at their operating point."""
        recs = [self._recommend(m) for m in self.measured]
        recs = [r for r in recs if r.feasible]
        recs.sort(key=lambda r: r.point.output_throughput_per_gpu, reverse=True)
        return recs[:top]

    def closest(self) -> Recommendation | None:
        """When nothing is feasible: the config whose best point misses the SLO by the least."""
        recs = [self._recommend(m) for m in self.measured]
        if not recs:
            return None
        return min(recs, key=lambda r: max((-t.margin for t in r.terms), default=0.0))

    def trial(self, number: int) -> Recommendation:
        """Trial ``number``'s config at its operating point (a reused trial's measurement is
        the one it reused); UserError when the trial has no measured load points."""
        by_id = {m.id: m for m in self.measurements}
        rows = [m for m in self.measurements if m.trial_number == number]
        if not rows:
            raise UserError(f"study {self.study_name!r} has no trial {number}")
        m = rows[-1]
        if m.status == Status.REUSED and m.reused_from in by_id:
            m = replace(by_id[m.reused_from], trial_number=m.trial_number)
        if not m.load_points:
            raise UserError(f"trial {number} of study {self.study_name!r} has no measured load "
                            f"points (status {m.status}"
                            + (f", {m.failure_class}" if m.failure_class else "") + ")")
        return self._recommend(m)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.measurements:
            out[m.status] = out.get(m.status, 0) + 1
        return out

    def points(self) -> list[FrontPoint]:
        """Every measured load point of the study, each marked with whether it meets the SLO."""
        return [FrontPoint(config=m.config, point=p, slo_met=self.slo.met(p),
                           trial_number=m.trial_number, measurement_id=m.id)
                for m in self.measured for p in m.load_points]

    def pareto(self, *, slo_met_only: bool = False) -> list[FrontPoint]:
        """Load points no other point beats on both tok/s per GPU and tok/s per user, sorted by
        tok/s per user (fastest first). Over all measured points, each marked ``slo_met``; with
        ``slo_met_only``, the front of the points that meet the SLO."""
        pts = [fp for fp in self.points() if fp.slo_met or not slo_met_only]
        return pareto_front(pts, key=lambda fp: fp.point)


def pareto_front(items: Sequence, key=lambda item: item[1]) -> list:
    """The items whose load point (``key(item)``) is non-dominated on (tok/s per GPU, tok/s per
    user), sorted by tok/s per user, fastest first."""
    ranked = sorted(items, key=lambda it: (-key(it).output_throughput_per_user,
                                           -key(it).output_throughput_per_gpu))
    front, best_gpu = [], float("-inf")
    for it in ranked:
        p = key(it)
        if p.output_throughput_per_gpu > best_gpu:
            front.append(it)
            best_gpu = p.output_throughput_per_gpu
    return front


__all__ = ["SCHEMA", "FrontPoint", "Recommendation", "Results", "SloTerm", "pareto_front",
           "slo_terms"]
