"""What a runner returns: load points (one per offered load) gathered in a Measurement."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np

from autotune.config import EngineConfig
from autotune.specs import Workload

#: Latency metrics and the statistics kept for each (all in milliseconds).
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
STATISTICS = ("mean", "p50", "p90", "p95", "p99")

#: Concurrency value that means "every request issued at once" (trtllm-bench's max-throughput mode).
MAX_CONCURRENCY = -1


class Status(StrEnum):
    """How one trial's measurement of a configuration ended (stored as its plain value)."""

    OK = "ok"  # measured: load points recorded
    REUSED = "reused"  # an earlier identical measurement stands for it (``reused_from``)
    INFEASIBLE = "infeasible"  # the runner says it can never run (out of memory, invalid layout)
    #: the performance model says it cannot run at all, so it was not run: a prediction, never
    #: a measurement (not reused: the engine may be asked another time)
    PREDICTED = "predicted"
    FAILED = "failed"  # the run broke (crash, timeout, bad report); may be tried again
    INTERRUPTED = "interrupted"  # stopped by the user; re-queued
    LOST = "lost"  # its worker died (no heartbeat); re-queued


#: Statuses whose result stands for the configuration (a later trial may reuse it).
REUSABLE = (Status.OK, Status.INFEASIBLE)


def replica_load(load: int, dp: int) -> int:
    """Requests in flight per replica when ``load`` requests are spread over ``dp`` replicas:
    ``ceil(load / dp)``, at least one (``MAX_CONCURRENCY`` stays "all at once")."""
    if load == MAX_CONCURRENCY:
        return MAX_CONCURRENCY
    return max(1, math.ceil(load / dp))


def in_flight(load: int, dp: int) -> int:
    """The total requests in flight when ``load`` is asked of ``dp`` replicas: each gets
    ``replica_load(load, dp)``, so ``dp`` times that (``MAX_CONCURRENCY`` stays "max"). It is
    the load a load point is labelled with."""
    if load == MAX_CONCURRENCY:
        return MAX_CONCURRENCY
    return replica_load(load, dp) * dp


def load_label(concurrency: int, dp: int = 1) -> str:
    """How a load is shown: ``max``, ``16``, or ``16 (2 per replica)`` over ``dp`` replicas."""
    if concurrency == MAX_CONCURRENCY:
        return "max"
    if dp > 1:
        return f"{concurrency} ({replica_load(concurrency, dp)} per replica)"
    return str(concurrency)


@dataclass(frozen=True)
class RequestBudget:
    """How many requests one load point runs on one replica: ``waves`` times the load in flight
    (capped at ``fit``, the requests the KV cache holds at once, when known), within
    ``[least, most]``; "max" runs ``waves * fit`` (or ``most`` when ``fit`` is unknown).

    A few waves of the load reach a steady state past the ramp-up and the drain.
    """

    least: int
    waves: int
    most: int

    def requests(self, per_replica_load: int, fit: int | None = None) -> int:
        if per_replica_load == MAX_CONCURRENCY:
            n = self.waves * fit if fit else self.most
        else:
            n = self.waves * (min(per_replica_load, fit) if fit else per_replica_load)
        return int(min(self.most, max(self.least, n)))


#: A real engine's benchmark run (the trtllm runner, and the deploy folder's ``bench.sh`` that
#: re-measures a recommendation the same way): every request costs real GPU time.
BENCH_REQUESTS = RequestBudget(least=64, waves=4, most=1024)


@dataclass(frozen=True)
class LoadPoint:
    """Metrics at one offered load.

    ``concurrency`` is the number of requests kept in flight over all replicas
    (``MAX_CONCURRENCY``: all at once). Throughputs are output tokens/s; ``latency_ms`` maps
    metric -> statistic -> milliseconds (``latency_ms["tpot"]["p99"]``).
    """

    concurrency: int
    num_requests: int
    request_throughput: float  # requests/s
    output_throughput: float  # output tokens/s of the whole deployment
    output_throughput_per_gpu: float  # output tokens/s per GPU
    output_throughput_per_user: float  # mean output tokens/s seen by one request while decoding
    duration_s: float  # first request issued to last request done
    latency_ms: dict[str, dict[str, float]] = field(hash=False)

    def latency(self, metric: str, stat: str) -> float:
        return self.latency_ms[metric][stat]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoadPoint:
        return cls(**data)


@dataclass(frozen=True)
class Measurement:
    """Everything one runner learned about one configuration under one workload."""

    runner: str
    config: EngineConfig
    workload: Workload
    load_points: tuple[LoadPoint, ...]
    max_requests_in_flight: int = 0  # how many requests the KV cache holds at once (all replicas)
    raw: dict = field(default_factory=dict, hash=False)  # runner-specific: reports, logs, paths

    def to_dict(self) -> dict:
        return {
            "runner": self.runner,
            "config": self.config.to_dict(),
            "workload": self.workload.to_dict(),
            "load_points": [lp.to_dict() for lp in self.load_points],
            "max_requests_in_flight": self.max_requests_in_flight,
        }


def summarize(values: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """Mean and percentiles of ``values`` (optionally weighted), as trtllm-bench reports them."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {s: float("nan") for s in STATISTICS}
    if weights is None:
        p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
        return {"mean": float(values.mean()), "p50": float(p50), "p90": float(p90),
                "p95": float(p95), "p99": float(p99)}
    order = np.argsort(values)
    v, w = values[order], np.asarray(weights, dtype=float)[order]
    cum = np.cumsum(w) / w.sum()
    pick = lambda q: float(v[min(np.searchsorted(cum, q), v.size - 1)])  # noqa: E731
    return {"mean": float(np.average(v, weights=w)), "p50": pick(0.50), "p90": pick(0.90),
            "p95": pick(0.95), "p99": pick(0.99)}


def load_point_from_requests(
    *,
    concurrency: int,
    gpus: int,
    start_s: np.ndarray,
    first_token_s: np.ndarray,
    end_s: np.ndarray,
    output_tokens: np.ndarray,
    itl_ms: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> LoadPoint:
    """Build a LoadPoint from per-request timestamps (seconds), with trtllm-bench's definitions.

    TTFT = first token - start; TPOT = (end - first token) / (output tokens - 1);
    e2e = end - start; system throughput = all output tokens / (last end - first start).
    ``itl_ms`` is (gap values, weights or None) when the caller knows the token gaps; else
    TPOT's.
    """
    ttft = (first_token_s - start_s) * 1e3
    decode_tokens = np.maximum(output_tokens - 1, 1)
    tpot = (end_s - first_token_s) * 1e3 / decode_tokens
    e2e = (end_s - start_s) * 1e3
    duration = float(end_s.max() - start_s.min())
    out_tok = float(output_tokens.sum())
    throughput = out_tok / duration if duration > 0 else 0.0
    itl = summarize(*itl_ms) if itl_ms is not None else summarize(tpot)
    # Per-user speed while streaming: 1000 / TPOT, averaged over requests (trtllm-bench's
    # "token output speed"); it is what an interactive user experiences.
    per_user = float(np.mean(1e3 / np.maximum(tpot, 1e-9)))
    return LoadPoint(
        concurrency=concurrency,
        num_requests=int(output_tokens.size),
        request_throughput=output_tokens.size / duration if duration > 0 else 0.0,
        output_throughput=throughput,
        output_throughput_per_gpu=throughput / gpus,
        output_throughput_per_user=per_user,
        duration_s=duration,
        latency_ms={"ttft": summarize(ttft), "tpot": summarize(tpot), "itl": itl,
                    "e2e": summarize(e2e)},
    )


__all__ = [
    "BENCH_REQUESTS",
    "LATENCY_METRICS",
    "REUSABLE",
    "RequestBudget",
    "Status",
    "LoadPoint",
    "MAX_CONCURRENCY",
    "Measurement",
    "STATISTICS",
    "in_flight",
    "load_label",
    "load_point_from_requests",
    "replica_load",
    "summarize",
]
