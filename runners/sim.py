"""The ``sim`` runner: the built-in performance model, no GPU needed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from autotune.config import EngineConfig, stable_hash
from autotune.errors import InvalidConfig, OutOfMemory
from autotune.measurement import MAX_CONCURRENCY, LoadPoint, Measurement, load_point_from_requests
from autotune.perfmodel import KV_BLOCK_TOKENS, Calibration, PerfModel
from autotune.runners._base import Runner
from autotune.scenario import Scenario
from autotune.scheduler import Limits, simulate
from autotune.specs import ModelSpec, Workload

#: Requests simulated per load point: a few waves of the concurrency, within these bounds.
MIN_REQUESTS, MAX_REQUESTS, WAVES = 32, 3000, 3


def check_layout(model: ModelSpec, config: EngineConfig) -> None:
    """TensorRT-LLM's validity rules for a parallel layout (raises InvalidConfig)."""
    if model.heads % config.tp:
        raise InvalidConfig(f"{model.heads} attention heads are not divisible by tp={config.tp}")
    if config.pp > model.layers:
        raise InvalidConfig(f"pp={config.pp} exceeds the model's {model.layers} layers")
    if min(config.tp, config.pp, config.dp, config.max_batch_size, config.max_num_tokens) < 1:
        raise InvalidConfig("tp, pp, dp, max_batch_size and max_num_tokens must be >= 1")
    if not 0 < config.kv_fraction < 1:
        raise InvalidConfig(f"kv_fraction must be in (0, 1), got {config.kv_fraction}")


def requests_for(concurrency: int, fit: int) -> int:
    """How many requests to simulate at one load (per replica)."""
    c = fit if concurrency == MAX_CONCURRENCY else min(concurrency, fit)
    return int(min(MAX_REQUESTS, max(MIN_REQUESTS, WAVES * c)))


class SimRunner(Runner):
    """Measures a configuration by simulating it (milliseconds per configuration)."""

    name = "sim"
    expensive = False  # milliseconds per load point: walk the whole ladder

    def __init__(self, scenario: Scenario, calibration: Calibration | None = None,
                 num_requests: int | None = None):
        super().__init__(scenario)
        self.calibration = calibration or scenario.calibration
        #: Requests per replica and load point; None: a few waves of the load (``requests_for``).
        #: Set it to reproduce a benchmark that ran a fixed data set (trtllm-bench --dataset).
        self.num_requests = num_requests

    def settings(self) -> dict:
        cal = self.calibration.to_dict() if self.calibration else None
        return {"runner": self.name, "calibration": cal}

    def model_for(self, config: EngineConfig) -> PerfModel:
        return PerfModel(self.scenario.model, self.scenario.gpu, config, self.calibration)

    def capacity(self, config: EngineConfig, workload: Workload) -> tuple[PerfModel, Limits, int]:
        """The replica's model, its scheduler limits and how many requests fit at once."""
        check_layout(self.scenario.model, config)
        perf = self.model_for(config)
        mem = perf.memory()
        if not mem.fits:
            raise OutOfMemory(
                f"weights {mem.weights / 2**30:.1f} GiB + activations {mem.activations / 2**30:.1f} "
                f"GiB leave no KV cache on a {self.scenario.gpu.memory_gib:g} GiB GPU"
            )
        micro = config.pp  # TensorRT-LLM keeps pp micro-batches in flight, each within the limits
        limits = Limits(
            max_in_flight=config.max_batch_size * micro,
            token_budget=config.max_num_tokens * micro,
            kv_blocks=mem.kv_tokens // KV_BLOCK_TOKENS,
            block_tokens=KV_BLOCK_TOKENS,
            chunked_prefill=config.chunked_prefill,
        )
        fit = min(limits.max_in_flight, mem.requests_that_fit(workload.max_seq_len))
        if fit < 1:
            raise OutOfMemory(
                f"the KV cache ({mem.kv_tokens} tokens) cannot hold one request of "
                f"{workload.max_seq_len} tokens"
            )
        return perf, limits, fit

    def measure(self, config: EngineConfig, workload: Workload, loads: Sequence[int]) -> Measurement:
        perf, limits, fit = self.capacity(config, workload)
        points: list[LoadPoint] = []
        for load in loads:
            per_replica = load if load == MAX_CONCURRENCY else max(1, math.ceil(load / config.dp))
            n = self.num_requests or requests_for(per_replica, fit)
            isl, osl = self._lengths(workload, n, config)
            trace = simulate(perf.iteration_time, isl, osl, limits,
                             concurrency=None if per_replica == MAX_CONCURRENCY else per_replica)
            points.append(_all_replicas(trace, load, config))
        return Measurement(
            runner=self.name, config=config, workload=workload, load_points=tuple(points),
            max_requests_in_flight=fit * config.dp,
            raw={"kv_tokens_per_replica": limits.kv_blocks * KV_BLOCK_TOKENS},
        )

    def measure_rates(self, config: EngineConfig, workload: Workload, rates: Sequence[float],
                      num_requests: int | None = None) -> list[LoadPoint]:
        """Open loop: requests arrive as a Poisson process at each rate (requests/s over all
        replicas), whatever the engine's progress, as in an online-serving benchmark.

        One load point per rate, its ``concurrency`` 0 (not a closed loop); latencies include the
        time a request waits for a batch slot or KV-cache blocks.
        """
        perf, limits, _ = self.capacity(config, workload)
        points: list[LoadPoint] = []
        for rate in rates:
            if not rate > 0:
                raise ValueError(f"request rates must be positive, got {rate!r}")
            per_replica = rate / config.dp
            n = num_requests or self.num_requests or MAX_REQUESTS // 3
            isl, osl = self._lengths(workload, n, config)
            seed = int(stable_hash(workload.to_dict(), config.to_dict(), f"rate={rate}"), 16)
            gaps = np.random.default_rng(seed % 2**32).exponential(1.0 / per_replica, n)
            arrivals = np.cumsum(gaps) - gaps[0]  # the first request at t=0
            trace = simulate(perf.iteration_time, isl, osl, limits, arrivals=arrivals)
            points.append(_all_replicas(trace, 0, config))
        return points

    @staticmethod
    def _lengths(workload: Workload, n: int, config: EngineConfig) -> tuple[np.ndarray, np.ndarray]:
        if workload.isl_std == 0 and workload.osl_std == 0:
            return np.full(n, workload.isl), np.full(n, workload.osl)
        # Seeded by the workload and config so a configuration always sees the same requests.
        rng = np.random.default_rng(int(stable_hash(workload.to_dict(), config.to_dict()), 16) % 2**32)
        isl = np.clip(np.rint(rng.normal(workload.isl, workload.isl_std, n)), 1,
                      workload.isl + 3 * workload.isl_std)
        osl = np.clip(np.rint(rng.normal(workload.osl, workload.osl_std, n)), 1,
                      workload.osl + 3 * workload.osl_std)
        return isl.astype(np.int64), osl.astype(np.int64)


def _all_replicas(trace, concurrency: int, config: EngineConfig) -> LoadPoint:
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
