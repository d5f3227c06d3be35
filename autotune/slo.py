"""The latency SLO grammar: ``ttft:p99<=2s,tpot:p50<20ms``.

A bound is ``METRIC:STAT OP VALUE[UNIT]``: METRIC one of ttft, tpot, itl, e2e; STAT one of
mean, p50, p90, p95, p99; OP ``<=`` or ``<``; UNIT ``ms`` (default) or ``s``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from autotune.errors import UserError
from autotune.measurement import LATENCY_METRICS, STATISTICS, LoadPoint

#: Name of the Optuna constraint saying whether a configuration could run at all (memory,
#: layout: 0.0) or not (1.0); the other constraints are the SLO's terms, named by ``Bound.name``.
FITS = "fits"

_BOUND = re.compile(
    r"^\s*(?P<metric>[a-z0-9]+)\s*:\s*(?P<stat>[a-z0-9]+)\s*(?P<op><=|<)\s*"
    r"(?P<value>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>ms|s)?\s*$"
)


@dataclass(frozen=True)
class Bound:
    """One term: ``metric``'s ``stat`` must stay below ``limit_ms``."""

    metric: str
    stat: str
    limit_ms: float
    strict: bool = False

    @property
    def name(self) -> str:
        return f"{self.metric}:{self.stat}"

    def __str__(self) -> str:
        op = "<" if self.strict else "<="
        return f"{self.name}{op}{self.limit_ms:g}ms"

    def measured(self, point: LoadPoint) -> float:
        return point.latency(self.metric, self.stat)

    def violation(self, point: LoadPoint) -> float:
        """Relative excess over the limit: <= 0 when met (Optuna's constraint convention)."""
        value = self.measured(point)
        if value != value:  # NaN: not measured, so not met
            return 1.0
        excess = (value - self.limit_ms) / self.limit_ms
        if self.strict and excess == 0:
            return 1e-9
        return excess


@dataclass(frozen=True)
class SLO:
    """A conjunction of bounds; the empty SLO (no bounds) means "maximum throughput"."""

    bounds: tuple[Bound, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.bounds)

    def __str__(self) -> str:
        return ",".join(str(b) for b in self.bounds)

    def violations(self, point: LoadPoint) -> dict[str, float]:
        return {b.name: b.violation(point) for b in self.bounds}

    def met(self, point: LoadPoint) -> bool:
        return all(v <= 0 for v in self.violations(point).values())

    def to_list(self) -> list[dict]:
        return [{"metric": b.metric, "stat": b.stat, "limit_ms": b.limit_ms, "strict": b.strict}
                for b in self.bounds]


def parse_slo(text: str | None) -> SLO:
    """Parse the SLO grammar; a bad part raises UserError naming that part."""
    if text is None or not text.strip():
        return SLO()
    bounds: list[Bound] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            raise UserError(f"bad SLO {text!r}: empty term (stray comma?)")
        m = _BOUND.match(part.lower())
        if not m:
            raise UserError(
                f"bad SLO term {part!r}: expected METRIC:STAT<=VALUE[ms|s], e.g. 'tpot:p99<=50ms'"
            )
        metric, stat = m["metric"], m["stat"]
        if metric not in LATENCY_METRICS:
            raise UserError(f"bad SLO term {part!r}: unknown metric {metric!r} "
                            f"(use {', '.join(LATENCY_METRICS)})")
        if stat not in STATISTICS:
            raise UserError(f"bad SLO term {part!r}: unknown statistic {stat!r} "
                            f"(use {', '.join(STATISTICS)})")
        value = float(m["value"]) * (1000.0 if m["unit"] == "s" else 1.0)
        if not 0 < value < float("inf"):
            raise UserError(f"bad SLO term {part!r}: the limit must be a positive, finite "
                            "number of milliseconds")
        bound = Bound(metric, stat, value, strict=m["op"] == "<")
        for other in bounds:
            if other.name == bound.name:
                raise UserError(
                    f"bad SLO {text!r}: {bound.name} is bounded twice ({other} and {bound})"
                )
        bounds.append(bound)
    _check_consistent(text, bounds)
    return SLO(tuple(bounds))




def _check_consistent(text: str, bounds: list[Bound]) -> None:
    """Refuse SLOs no configuration can meet: e.g. e2e tighter than ttft (e2e >= ttft)."""
    by = {(b.metric, b.stat): b.limit_ms for b in bounds}
    for stat in STATISTICS:
        e2e, ttft = by.get(("e2e", stat)), by.get(("ttft", stat))
        if e2e is not None and ttft is not None and e2e < ttft:
            raise UserError(f"contradictory SLO {text!r}: e2e:{stat} ({e2e:g}ms) can never be "
                            f"below ttft:{stat} ({ttft:g}ms)")


__all__ = ["FITS", "Bound", "SLO", "parse_slo"]
