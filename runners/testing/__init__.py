"""``RunnerContract``: the conformance tests every runner passes (import it in a test module).

Subclass it in a test module and provide the ``runner`` fixture (a runner for a Llama-3.1-8B
on 8xH100 scenario, or the scenario your runner needs) plus ``oom_config`` (a config that cannot
fit); override ``config`` for a scenario of another size. The sim runner, the trtllm runner
(against its stand-in) and the vllm runner (against its stand-in and a real vLLM engine) all
pass it. Tests that measure one config come first and the ones that start others last, so a
runner that keeps a server for its config between calls (vllm) starts it once.

``vllm_standin`` is a stand-in ``vllm`` for fast tests of a runner of a real engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from autotune.config import EngineConfig
from autotune.errors import InvalidConfig, OutOfMemory, TrialFailure, UserError
from autotune.measurement import LATENCY_METRICS, MAX_CONCURRENCY, STATISTICS
from autotune.runners import Runner


class RunnerContract:
    """Behaviour shared by every runner. Fixtures to provide: ``runner``, ``oom_config``."""

    @pytest.fixture
    def runner(self):  # pragma: no cover - abstract fixture
        raise NotImplementedError

    @pytest.fixture
    def oom_config(self) -> EngineConfig:  # pragma: no cover - abstract fixture
        raise NotImplementedError

    @pytest.fixture
    def config(self, runner) -> EngineConfig:
        return EngineConfig(tp=2, pp=1, dp=1, max_batch_size=64, max_num_tokens=4096,
                            precision=runner.scenario.precision)

    def test_one_load_point_per_load_in_order(self, runner, config):
        loads = [4, 1, MAX_CONCURRENCY]
        m = runner.measure(config, runner.scenario.workload, loads)
        assert [p.concurrency for p in m.load_points] == loads
        assert m.config == config and m.runner == runner.name

    def test_metrics_are_complete_and_consistent(self, runner, config):
        (p,) = runner.measure(config, runner.scenario.workload, [8]).load_points
        assert p.output_throughput > 0 and p.request_throughput > 0
        assert math.isclose(p.output_throughput_per_gpu * config.gpus, p.output_throughput,
                            rel_tol=1e-6)
        for metric in LATENCY_METRICS:
            stats = p.latency_ms[metric]
            assert set(stats) >= set(STATISTICS)
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p95"] <= stats["p99"]
        assert p.latency("e2e", "p50") >= p.latency("ttft", "p50")

    def test_more_load_means_more_throughput_and_latency(self, runner, config):
        low, high = runner.measure(config, runner.scenario.workload, [1, 32]).load_points
        assert high.output_throughput > low.output_throughput
        assert high.latency("tpot", "mean") >= low.latency("tpot", "mean")

    def test_a_load_point_says_what_was_in_flight_over_all_replicas(self, runner, config):
        replicas = replace(config, pp=1, dp=2)
        # 3 requests over 2 replicas: each gets 2, so 4 are in flight.
        (p,) = runner.measure(replicas, runner.scenario.workload, [3]).load_points
        assert p.concurrency == 4
        assert math.isclose(p.output_throughput_per_gpu * replicas.gpus, p.output_throughput,
                            rel_tol=1e-6)

    def test_config_that_cannot_fit_is_out_of_memory(self, runner, oom_config):
        with pytest.raises(OutOfMemory) as info:
            runner.measure(oom_config, runner.scenario.workload, [1])
        assert isinstance(info.value, TrialFailure) and info.value.infeasible
        assert str(info.value)

    def test_heads_not_divisible_by_tp_is_invalid(self, runner):
        heads = runner.scenario.model.heads
        tp = next(t for t in (3, 5, 6, 7) if heads % t)
        bad = EngineConfig(tp=tp, precision=runner.scenario.precision)
        with pytest.raises(InvalidConfig):
            runner.measure(bad, runner.scenario.workload, [1])

    def test_settings_are_json_able_and_stable(self, runner):
        settings = runner.settings()
        assert settings["runner"] == runner.name
        assert json.loads(json.dumps(settings, sort_keys=True)) == settings
        assert runner.settings() == settings  # the same runner, the same dedup key

    def test_interrupt_and_close_are_idempotent(self, runner, config):
        runner.interrupt()
        runner.interrupt()
        runner.close()
        runner.close()

    def test_declares_its_options_and_refuses_others(self, runner):
        assert isinstance(runner, Runner)
        names = type(runner).option_names()
        assert all(isinstance(n, str) for n in names)
        with pytest.raises(UserError, match="does not take --no-such-option"):
            type(runner).check_options(runner.scenario, no_such_option=1)
