"""Load points from the model: a configuration simulated at closed-loop loads or Poisson rates.

``Simulator`` is the whole built-in performance model behind one call: the layout rules, the
memory plan, the iteration time and the event-driven scheduler, summarised as ``trtllm-bench``
summarises a run. The ``sim`` runner is a thin adapter over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from autotune.config import EngineConfig, stable_hash
from autotune.measurement import (
    MAX_CONCURRENCY,
    LoadPoint,
    Measurement,
    RequestBudget,
    in_flight,
    load_point_from_requests,
    replica_load,
)
from autotune.model.calibration import Calibration
from autotune.model.feasibility import Capacity, check_layout, check_placement, replica_capacity
from autotune.model.perf import KV_BLOCK_TOKENS, PerfModel
from autotune.model.scheduler import ContextWait, Trace, simulate
from autotune.specs import GpuSpec, ModelSpec, Workload

#: Requests simulated per replica and load point. A simulated request costs microseconds, so
#: the model affords more waves than a real benchmark; the accuracy figures were fitted with
#: these numbers.
SIM_REQUESTS = RequestBudget(least=32, waves=3, most=3000)
#: Requests per rate of an open-loop (Poisson) simulation.
RATE_REQUESTS = SIM_REQUESTS.most // 3


@dataclass(frozen=True)
class Benchmark:
    """How a closed-loop serving client runs one load point (``vllm bench serve``, InferenceX).

    It issues ``prompts_per_concurrency x concurrency`` requests, ``concurrency`` in flight at
    any time, and averages over all of them: the first wave arrives together (the warm-up
    burst), the later ones wherever a slot frees up (the staggered steady state). Lengths are
    drawn uniformly from ``[range_ratio x L, L]`` (vLLM's ``random`` data set up to 0.8 as
    InferenceX runs it, ``--random-range-ratio 0.8``), which is what keeps requests from
    finishing in lockstep. The defaults are InferenceX's: ``--num-prompts $((CONC * 10))``.

    ``queued``: requests the client keeps in flight beyond the load point's concurrency, which
    the engine's batch (``max_batch_size`` = concurrency) cannot take: each new request then
    waits for the next completion, one request's duration / concurrency on average, before its
    prefill (what the TTFT of a harness that runs the engine one batch slot short of its
    client shows: it falls as concurrency rises and grows with the output length).
    """

    prompts_per_concurrency: int = 10
    range_ratio: float = 0.8  # shortest length as a share of the nominal one (1: fixed lengths)
    min_prompts: int = 16  # a low concurrency still runs enough requests to average over
    queued: int = 0  # requests in flight beyond the engine's batch slots (requests)

    def prompts(self, concurrency: int) -> int:
        return max(self.min_prompts, self.prompts_per_concurrency * concurrency)

    def lengths(self, nominal: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` lengths uniform over ``[range_ratio x nominal, nominal]`` (tokens)."""
        low = max(1, int(nominal * self.range_ratio))
        return rng.integers(low, nominal + 1, n).astype(np.int64)


class Simulator:
    """The built-in model of ``model`` on ``gpu`` with ``calibration`` (None: the shipped
    constants of each config's precision).

    ``num_requests`` fixes the requests per replica and load point (to reproduce a benchmark that
    ran a fixed data set, trtllm-bench --dataset); None follows ``SIM_REQUESTS``. ``engine``
    (None: TensorRT-LLM) picks which engine's shipped constants apply when ``calibration`` is
    None. ``benchmark``: closed-loop load points are run the way that client runs them (None:
    ``SIM_REQUESTS`` requests of the workload's lengths). ``context_wait``: the engine holds new
    prompts back to batch them (``ContextWait``; None: engines' default, it does not).
    """

    name = "sim"
    expensive = False  # milliseconds per load point

    def __init__(self, model: ModelSpec, gpu: GpuSpec, calibration: Calibration | None = None,
                 num_requests: int | None = None, engine: str | None = None,
                 benchmark: Benchmark | None = None, context_wait: ContextWait | None = None):
        self.model, self.gpu = model, gpu
        self.context_wait = context_wait
        self.calibration = calibration
        self.num_requests = num_requests
        self.engine = engine
        self.benchmark = benchmark

    def perf(self, config: EngineConfig) -> PerfModel:
        """The memory plan and iteration time of one replica of ``config``."""
        return PerfModel(self.model, self.gpu, config, self.calibration, engine=self.engine)

    def capacity(self, config: EngineConfig, workload: Workload) -> tuple[PerfModel, Capacity]:
        """The replica's model and capacity (InvalidConfig / OutOfMemory when it cannot run)."""
        check_layout(self.model, config)
        if config.tp * config.pp > self.gpu.gpus_per_node:
            check_placement(self.gpu, config)  # a replica over several nodes
        perf = self.perf(config)
        return perf, replica_capacity(perf, workload.max_seq_len)

    def measure(self, config: EngineConfig, workload: Workload, loads: Sequence[int]
                ) -> Measurement:
        """One load point per load (total requests in flight over all replicas, or "max")."""
        perf, cap = self.capacity(config, workload)
        points: list[LoadPoint] = []
        for load in loads:
            per_replica = replica_load(load, config.dp)
            clients = per_replica
            if self.benchmark is not None and per_replica != MAX_CONCURRENCY:
                n = self.num_requests or self.benchmark.prompts(per_replica)
                isl, osl = self._benchmark_lengths(workload, n, config, per_replica)
                clients = per_replica + self.benchmark.queued
            else:
                n = self.num_requests or SIM_REQUESTS.requests(per_replica, cap.fit)
                isl, osl = self._lengths(workload, n, config)
            trace = simulate(perf.iteration_time, isl, osl, cap.limits,
                             concurrency=None if per_replica == MAX_CONCURRENCY else clients,
                             wait=self.context_wait)
            points.append(_all_replicas(_served(trace, perf), in_flight(load, config.dp),
                                        config))
        return Measurement(
            runner=self.name, config=config, workload=workload, load_points=tuple(points),
            max_requests_in_flight=cap.fit * config.dp,
            raw={"kv_tokens_per_replica": cap.limits.kv_blocks * KV_BLOCK_TOKENS},
        )

    def measure_rates(self, config: EngineConfig, workload: Workload, rates: Sequence[float],
                      num_requests: int | None = None) -> list[LoadPoint]:
        """Open loop: requests arrive as a Poisson process at each rate (requests/s over all
        replicas), whatever the engine's progress, as in an online-serving benchmark.

        One load point per rate, its ``concurrency`` 0 (not a closed loop); latencies include the
        time a request waits for a batch slot or KV-cache blocks.
        """
        perf, cap = self.capacity(config, workload)
        points: list[LoadPoint] = []
        for rate in rates:
            if not rate > 0:
                raise ValueError(f"request rates must be positive, got {rate!r}")
            per_replica = rate / config.dp
            n = num_requests or self.num_requests or RATE_REQUESTS
            isl, osl = self._lengths(workload, n, config)
            seed = int(stable_hash(workload.to_dict(), config.to_dict(), f"rate={rate}"), 16)
            gaps = np.random.default_rng(seed % 2**32).exponential(1.0 / per_replica, n)
            arrivals = np.cumsum(gaps) - gaps[0]  # the first request at t=0
            trace = simulate(perf.iteration_time, isl, osl, cap.limits, arrivals=arrivals,
                             wait=self.context_wait)
            points.append(_all_replicas(_served(trace, perf), 0, config))
        return points

    def _benchmark_lengths(self, workload: Workload, n: int, config: EngineConfig,
                           load: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(
            int(stable_hash(workload.to_dict(), config.to_dict(), f"bench={load}"), 16) % 2**32)
        assert self.benchmark is not None
        return (self.benchmark.lengths(workload.isl, n, rng),
                self.benchmark.lengths(workload.osl, n, rng))

    @staticmethod
    def _lengths(workload: Workload, n: int, config: EngineConfig) -> tuple[np.ndarray, np.ndarray]:
        if workload.isl_std == 0 and workload.osl_std == 0:
            return np.full(n, workload.isl), np.full(n, workload.osl)
        # Seeded by the workload and config so a configuration always sees the same requests.
        rng = np.random.default_rng(
            int(stable_hash(workload.to_dict(), config.to_dict()), 16) % 2**32)
        isl = np.clip(np.rint(rng.normal(workload.isl, workload.isl_std, n)), 1,
                      workload.isl + 3 * workload.isl_std)
        osl = np.clip(np.rint(rng.normal(workload.osl, workload.osl_std, n)), 1,
                      workload.osl + 3 * workload.osl_std)
        return isl.astype(np.int64), osl.astype(np.int64)


def _served(trace: Trace, perf: PerfModel) -> Trace:
    """``trace`` as the client sees it: each request's first token and end come its
    ``request_overhead_ms`` later (the server's path outside the GPU's iterations). The closed
    loop's next request is still issued at the engine's completion: a few milliseconds per
    request of tens to thousands."""
    lag = perf.cal.request_overhead_ms * 1e-3
    if not lag:
        return trace
    return replace(trace, first_token=trace.first_token + lag, end=trace.end + lag)


def _all_replicas(trace: Trace, concurrency: int, config: EngineConfig) -> LoadPoint:
    """The load point of all ``config.dp`` replicas, each serving what ``trace`` (one replica's
    simulation) did: dp replicas serve independent streams, so throughput adds up and latency
    does not change."""
    point = load_point_from_requests(
        concurrency=concurrency, gpus=config.gpus_per_replica, start_s=trace.start,
        first_token_s=trace.first_token, end_s=trace.end, output_tokens=trace.output_tokens,
        itl_ms=(trace.itl_values_ms, trace.itl_weights),
    )
    return replace(
        point,
        num_requests=point.num_requests * config.dp,
        request_throughput=point.request_throughput * config.dp,
        output_throughput=point.output_throughput * config.dp,
    )


__all__ = ["RATE_REQUESTS", "SIM_REQUESTS", "Benchmark", "Simulator"]
