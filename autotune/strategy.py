"""How a study spends its trials: the sampler, the start-up plan and the model's prior.

Each real trial can cost an hour of eight GPUs, so the first trials are not left to chance:

- **Start-up plan.** The parallel layout decides most of a configuration's throughput and is the
  one setting TPE cannot learn from neighbours (its choices are unordered). The study's first
  trials are one per layout, each with the scheduler settings that are good almost everywhere
  (the largest batch limit: the load ladder picks the load anyway; TensorRT-LLM's default token
  budget and KV share; chunked prefill). TPE then refines batch, tokens and KV share around the
  layouts that did well.
- **Prior** (``--prior sim``). Before any real run, the built-in model scores the whole space in
  seconds; its best distinct configurations, spread over different layouts, are the first real
  trials instead of the start-up plan.
- **Sampler.** Multivariate, grouped TPE with constant liar (workers sharing a study don't all
  propose the same point) and with the SLO terms as constraints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import optuna

from autotune.config import DEFAULT_KV_FRACTION, DEFAULT_MAX_NUM_TOKENS, EngineConfig
from autotune.errors import TrialFailure
from autotune.scenario import Scenario
from autotune.space import Layout, SearchSpace

#: How many of the prior's best configurations become the first real trials.
PRIOR_TRIALS = 6


def make_sampler(space: SearchSpace, layouts: Sequence[Layout], seed: int | None = None
                 ) -> optuna.samplers.BaseSampler:
    """The study's sampler (the same for every worker, each with its own seed)."""
    startup = max(len(layouts), min(10, max(4, space.size(list(layouts)) // 20)))
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, constant_liar=True,
        n_startup_trials=startup,
    )


def _nearest(choices: Iterable, target):
    return min(choices, key=lambda v: (abs(v - target), -v))


def startup_configs(space: SearchSpace, layouts: Sequence[Layout], precision: str
                    ) -> list[EngineConfig]:
    """One configuration per layout with the settings that are good almost everywhere."""
    batch = max(space.max_batch_size)
    tokens = _nearest(space.max_num_tokens, DEFAULT_MAX_NUM_TOKENS)
    kv = _nearest(space.kv_fraction, DEFAULT_KV_FRACTION)
    chunked = True if True in space.chunked_prefill else space.chunked_prefill[0]
    # Fewest GPUs per replica first: when the trial budget runs out early, the cheap layouts
    # (often the best throughput) have been seen.
    ordered = sorted(layouts, key=lambda lay: (lay.tp * lay.pp, lay.pp))
    return [EngineConfig(lay.tp, lay.pp, lay.dp, batch, tokens, kv, chunked, precision)
            for lay in ordered]


@dataclass(frozen=True)
class Scored:
    """A configuration and the model's objective for it (output tok/s per GPU; -inf if it
    cannot run), and whether the model says it meets the SLO."""

    config: EngineConfig
    objective: float
    feasible: bool


def score_space(configs: Iterable[EngineConfig], evaluate: Callable[[EngineConfig], tuple[float, bool]],
                progress: Callable[[int], None] | None = None) -> list[Scored]:
    """Evaluate every configuration with ``evaluate`` (config -> (objective, feasible))."""
    out = []
    for i, config in enumerate(configs):
        try:
            objective, feasible = evaluate(config)
        except TrialFailure:
            objective, feasible = float("-inf"), False
        out.append(Scored(config, objective, feasible))
        if progress is not None:
            progress(i + 1)
    return out


def pick_prior(scored: Sequence[Scored], k: int = PRIOR_TRIALS) -> list[EngineConfig]:
    """The ``k`` best predicted configurations, spread over layouts.

    Best first, at most one per layout in a first pass (a model's error is mostly per layout:
    its second-best config of the same layout teaches little), then the next best of any layout.
    Feasible ones first; if the model thinks nothing is feasible, the closest by objective.
    """
    ranked = sorted(scored, key=lambda s: (s.feasible, s.objective), reverse=True)
    ranked = [s for s in ranked if s.objective > float("-inf")]
    picked: list[EngineConfig] = []
    seen_layouts = set()
    for s in ranked:
        lay = (s.config.tp, s.config.pp, s.config.dp)
        if lay not in seen_layouts:
            picked.append(s.config)
            seen_layouts.add(lay)
        if len(picked) == k:
            return picked
    for s in ranked:
        if s.config not in picked:
            picked.append(s.config)
        if len(picked) == k:
            break
    return picked


def sim_prior(scenario: Scenario, space: SearchSpace, layouts: Sequence[Layout],
              k: int = PRIOR_TRIALS, progress: Callable[[int], None] | None = None
              ) -> list[EngineConfig]:
    """Score the whole space with the built-in model and pick the first real trials."""
    from autotune.runners.sim import SimRunner
    from autotune.study import measure_ladder, operating_point

    sim = SimRunner(scenario)

    def evaluate(config: EngineConfig) -> tuple[float, bool]:
        points, _ = measure_ladder(sim, config, scenario.workload, space.concurrency,
                                   scenario.slo)
        point, feasible = operating_point(points, scenario.slo)
        return point.output_throughput_per_gpu, feasible

    scored = score_space(space.configs(list(layouts), scenario.precision), evaluate, progress)
    return pick_prior(scored, k)


__all__ = ["PRIOR_TRIALS", "Scored", "make_sampler", "pick_prior", "score_space", "sim_prior",
           "startup_configs"]
