"""What the study found: the best feasible configs, the closest miss, the Pareto front."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autotune.config import EngineConfig
from autotune.db import Store, StoredMeasurement
from autotune.errors import UserError
from autotune.launch import LaunchPlan, launch_plan
from autotune.measurement import LoadPoint
from autotune.slo import SLO, parse_slo
from autotune.study import operating_point

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
    launch: LaunchPlan

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
            "throughput": {
                "output_tok_s": p.output_throughput,
                "output_tok_s_per_gpu": p.output_throughput_per_gpu,
                "output_tok_s_per_user": p.output_throughput_per_user,
                "requests_per_s": p.request_throughput,
            },
            "latency_ms": p.latency_ms,
            "slo": [t.to_dict() for t in self.terms],
            "launch": self.launch.to_dict(),
        }


def slo_terms(slo: SLO, point: LoadPoint) -> tuple[SloTerm, ...]:
    out = []
    for b in slo.bounds:
        value = b.measured(point)
        out.append(SloTerm(term=str(b), metric=b.metric, stat=b.stat, limit_ms=b.limit_ms,
                           measured_ms=value, margin=(b.limit_ms - value) / b.limit_ms,
                           met=b.violation(point) <= 0))
    return tuple(out)


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
        self.slo = parse_slo(self.scenario.get("slo") or None)
        self.model_ref = (self.scenario.get("model_spec", {}).get("hf_name")
                          or self.scenario["model"])
        self.measurements = store.measurements(study_name)
        # Reused rows carry no load points of their own: each config counts once.
        self.measured = [m for m in self.measurements if m.status == "ok" and m.load_points]

    def _recommend(self, m: StoredMeasurement) -> Recommendation:
        point, feasible = operating_point(m.load_points, self.slo)
        return Recommendation(config=m.config, point=point, terms=slo_terms(self.slo, point),
                              feasible=feasible, trial_number=m.trial_number,
                              measurement_id=m.id, runner=m.runner,
                              launch=launch_plan(m.config, self.model_ref))

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

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.measurements:
            out[m.status] = out.get(m.status, 0) + 1
        return out

    def pareto(self) -> list[tuple[EngineConfig, LoadPoint]]:
        """Load points no other point beats on both tok/s per GPU and tok/s per user."""
        return pareto_front([(m.config, p) for m in self.measured for p in m.load_points])


def pareto_front(points: Sequence[tuple[EngineConfig, LoadPoint]]
                 ) -> list[tuple[EngineConfig, LoadPoint]]:
    """The non-dominated (per-GPU, per-user) throughput pairs, sorted by per-user speed."""
    ranked = sorted(points, key=lambda cp: (-cp[1].output_throughput_per_user,
                                            -cp[1].output_throughput_per_gpu))
    front, best_gpu = [], float("-inf")
    for cfg, p in ranked:
        if p.output_throughput_per_gpu > best_gpu:
            front.append((cfg, p))
            best_gpu = p.output_throughput_per_gpu
    return front


__all__ = ["Recommendation", "Results", "SCHEMA", "SloTerm", "pareto_front", "slo_terms"]
