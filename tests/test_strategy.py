"""How a study spends its trials: the start-up plan, the model's prior, the operating-point
search."""

import math

import optuna
import pytest

from autotune.config import EngineConfig
from autotune.measurement import LoadPoint, Measurement
from autotune.runners import Runner
from autotune.runners.sim import SimRunner
from autotune.scenario import Scenario
from autotune.space import SearchSpace
from autotune.strategy import (
    ADAPTIVE_ATTR,
    PLAN_ATTR,
    Scored,
    next_planned,
    pick_prior,
    sim_prior,
    startup_configs,
)
from autotune.study import Tuner, open_storage
from autotune.sweep import bisect_ladder, measure_ladder, operating_point

SPACE = {"tp": [1, 2, 4, 8], "pp": [1, 2], "max_batch_size": [32, 256],
         "max_num_tokens": [4096, 8192], "kv_fraction": [0.85, 0.9],
         "chunked_prefill": [True, False],
         "concurrency": [1, 2, 4, 8, 16, 32, 64, 128, 256, "max"]}


@pytest.fixture
def scenario():
    return Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=8, precision="fp8",
                          isl=1024, osl=128, slo="tpot:p99<=40ms")


class Counting(SimRunner):
    """The sim, counting the load points asked of it."""

    runs = 0

    def measure(self, config, workload, loads):
        self.runs += len(loads)
        return super().measure(config, workload, loads)


def test_startup_plan_is_one_strong_config_per_layout(scenario):
    space = SearchSpace.from_dict(SPACE)
    layouts = space.layouts(scenario)
    plan = startup_configs(space, layouts, scenario.precision)
    assert (sorted((c.tp, c.pp, c.dp) for c in plan)
            == sorted((lay.tp, lay.pp, lay.dp) for lay in layouts))
    assert all(c.max_batch_size == 256 and c.max_num_tokens == 8192 and c.kv_fraction == 0.9
               and c.chunked_prefill for c in plan)
    # Smallest replicas first; of one size, the fewest pipeline stages first under a latency
    # bound and the most without one (sends instead of all-reduces).
    assert [(c.tp * c.pp, c.pp) for c in plan] == sorted((c.tp * c.pp, c.pp) for c in plan)
    unbounded = startup_configs(space, layouts, scenario.precision, latency_bound=False)
    assert [(c.tp * c.pp, -c.pp) for c in unbounded] == sorted(
        (c.tp * c.pp, -c.pp) for c in unbounded)
    assert sorted(unbounded, key=lambda c: (c.tp, c.pp)) == sorted(plan, key=lambda c: (c.tp, c.pp))


def test_a_new_study_runs_the_plan_first_and_a_resumed_one_does_not_repeat_it(scenario, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    space = SearchSpace.from_dict(SPACE)
    tuner = Tuner(scenario, space, SimRunner(scenario), open_storage(url), "s", seed=0)
    tuner.open()
    plan = startup_configs(space, tuner.layouts, scenario.precision)
    tuner.optimize(len(plan) + 2)
    first = [EngineConfig.from_dict(t.user_attrs["config"]) for t in tuner.study.trials[:len(plan)]]
    # All of it first, the smallest replicas first; then, since that met the SLO, the largest
    # replicas, and the rest nearest the best size so far (test below).
    assert first[0] == plan[0] and sorted(first, key=str) == sorted(plan, key=str)

    # The plan was already run: a resumed search climbs from the best trial instead.
    again = Tuner(scenario, space, SimRunner(scenario), open_storage(url), "s", seed=1)
    again.open()
    planned = {tuple(sorted(SearchSpace.params_of(c).items())) for c in plan}
    following = again.sampler.next_params(again.study)
    assert following is not None and tuple(sorted(following.items())) not in planned
    done = {tuple(sorted(t.params.items())) for t in again.study.trials}
    assert tuple(sorted(following.items())) not in done


def test_under_an_slo_the_plan_tries_both_ends_then_the_size_nearest_the_best(scenario, tmp_path):
    space = SearchSpace.from_dict(SPACE)
    tuner = Tuner(scenario, space, SimRunner(scenario),
                  open_storage(f"sqlite:///{tmp_path / 'a.db'}"), "a", seed=0)
    tuner.open()
    plan = startup_configs(space, tuner.layouts, scenario.precision)
    tuner.optimize(len(plan))
    trials = tuner.study.trials
    sizes = [t.user_attrs["config"]["tp"] * t.user_attrs["config"]["pp"] for t in trials]
    assert trials[0].constraints["tpot:p99"] <= 0  # the smallest replicas meet this SLO ...
    assert sizes[0] == min(sizes) and sizes[1] == max(sizes)  # ... so the largest go next
    # Every later one is a size at least as close to the best so far as any size left.
    for i in range(2, len(trials)):
        met = [t for t in trials[:i] if max(t.constraints.values()) <= 0]
        best = max(met, key=lambda t: t.value)
        target = math.log2(best.user_attrs["config"]["tp"] * best.user_attrs["config"]["pp"])
        left = [math.log2(s) for s in sizes[i:]]
        assert abs(math.log2(sizes[i]) - target) == min(abs(x - target) for x in left)


def test_hill_climbing_tries_the_incumbents_neighbours_then_hands_over_to_tpe(scenario, tmp_path):
    space = SearchSpace.from_dict({**SPACE, "tp": [8], "pp": [1],  # one layout: plan of one
                                   "max_num_tokens": [4096, 8192, 16384, 32768]})
    tuner = Tuner(scenario, space, SimRunner(scenario),
                  open_storage(f"sqlite:///{tmp_path / 'h.db'}"), "h", seed=0)
    tuner.open()
    tuner.optimize(1)
    (first,) = tuner.study.trials
    assert first.params["max_num_tokens"] == 16384

    def steps(binding):
        return [tuple(sorted(set(n.items()) - set(first.params.items())))
                for n in tuner.sampler.neighbours(first.params, binding)]

    # One step along each ordered setting (both ways where the list allows; the token budget
    # also two), the other chunked-prefill choice, and the token budget moved with it; no
    # other layout exists.
    unchunked = ("chunked_prefill", False)
    assert sorted(steps(None)) == sorted([
        (("max_num_tokens", 8192),), (("max_num_tokens", 32768),), (("max_num_tokens", 4096),),
        (("kv_fraction", 0.85),), (("max_batch_size", 32),), (unchunked,),
        (unchunked, ("max_num_tokens", 8192)), (unchunked, ("max_num_tokens", 32768)),
        (unchunked, ("max_num_tokens", 4096))])
    # What limits the incumbent orders them: a TTFT-bound one prefills more per iteration
    # first, a TPOT-bound one less, one that misses its first-token bound outright tries the
    # budget both ways first; a smaller KV share (never more room) always comes last.
    assert steps("ttft")[0] == (("max_num_tokens", 32768),)
    assert steps("tpot")[0] == (("max_num_tokens", 8192),)
    assert set(steps("miss")[:2]) == {(("max_num_tokens", 8192),), (("max_num_tokens", 32768),)}
    assert {steps(b)[-1] for b in (None, "ttft", "tpot", "miss")} == {(("kv_fraction", 0.85),)}
    # This SLO is a TPOT bound, which the operating point runs up against: the climb's first
    # step is the smaller token budget.
    assert first.constraints["tpot:p99"] > -0.2
    tuner.optimize(2)
    assert tuner.study.trials[1].params == {**first.params, "max_num_tokens": 8192}
    # The plan ends when the incumbent's neighbourhood is exhausted.
    tuner.optimize(40)
    assert tuner.sampler.next_params(tuner.study) is None


def _trial(layout, value, tpot, **settings):
    """A finished trial of ``layout`` (label) with the default settings but ``settings``."""
    params = {"layout": layout, "max_batch_size": 256, "max_num_tokens": 8192,
              "kv_fraction": 0.9, "chunked_prefill": True, **settings}
    return optuna.trial.create_trial(
        params=params, value=value,
        distributions={k: optuna.distributions.CategoricalDistribution([v])
                       for k, v in params.items()},
        constraints={"fits": 0.0, "tpot:p99": tpot})


def _plan(*layouts):
    return {PLAN_ATTR: [_trial(lay, 0, 0).params for lay in layouts], ADAPTIVE_ATTR: True}


def _steps(params):
    """Neighbours of a configuration: the token budget halved or doubled."""
    return [{**params, "max_num_tokens": params["max_num_tokens"] // 2},
            {**params, "max_num_tokens": params["max_num_tokens"] * 2}]


def test_a_runner_up_far_behind_the_leader_is_not_climbed_beside_it():
    attrs = _plan("tp1-pp1-dp8", "tp1-pp2-dp4")
    near = [_trial("tp1-pp1-dp8", 100.0, -0.1), _trial("tp1-pp2-dp4", 97.0, -0.1)]
    far = [_trial("tp1-pp1-dp8", 100.0, -0.1), _trial("tp1-pp2-dp4", 80.0, -0.1)]
    # Within a few percent, the runner-up's neighbourhood is tried beside the leader's ...
    taken = list(near)
    for _ in range(4):
        taken.append(_trial(value=1.0, tpot=-0.1,
                             **next_planned(taken, attrs, lambda p, b: _steps(p))))
    assert {t.params["layout"] for t in taken[2:]} == {"tp1-pp1-dp8", "tp1-pp2-dp4"}
    # ... one far behind waits until the leader's is done.
    taken = list(far)
    for _ in range(2):
        taken.append(_trial(value=1.0, tpot=-0.1,
                             **next_planned(taken, attrs, lambda p, b: _steps(p))))
    assert [t.params["layout"] for t in taken[2:]] == ["tp1-pp1-dp8"] * 2
    assert next_planned(taken, attrs, lambda p, b: _steps(p)) is None


def test_after_the_climb_the_leaders_settings_are_tried_on_a_layout_far_behind():
    attrs = _plan("tp1-pp1-dp8", "tp2-pp1-dp4")
    taken = [_trial("tp1-pp1-dp8", 100.0, -0.1), _trial("tp2-pp1-dp4", 60.0, -0.05)]

    def climb(value_of):
        while (params := next_planned(taken, attrs, lambda p, b: _steps(p))) is not None:
            taken.append(_trial(value=value_of(params), tpot=-0.1, **params))
            yield params

    # The leader gains from a smaller token budget; the runner-up, 40% behind, is not climbed
    # beside it, but once the leader's climb is done its best settings are tried there once ...
    def value(params):
        gain = {4096: 1.1, 2048: 1.0}.get(params["max_num_tokens"], 0.9)
        base = {"tp1-pp1-dp8": 100.0, "tp2-pp1-dp4": 60.0}[params["layout"]]
        return base * gain

    steps = list(climb(value))
    assert [p["layout"] for p in steps[:-1]] == ["tp1-pp1-dp8"] * (len(steps) - 1)
    assert steps[-1] == {**taken[0].params, "layout": "tp2-pp1-dp4", "max_num_tokens": 4096}
    # ... and where they put it ahead, it is climbed in turn.
    taken = taken[:2]
    steps = list(climb(lambda p: 200.0 if p["layout"] == "tp2-pp1-dp4" and
                       p["max_num_tokens"] <= 4096 else value(p)))
    after = steps.index({**taken[0].params, "layout": "tp2-pp1-dp4", "max_num_tokens": 4096})
    assert steps[after + 1]["layout"] == "tp2-pp1-dp4"


def _moves(params):
    """Five neighbours: the token budget two ways, the KV share two ways, the batch limit."""
    return [{**params, "max_num_tokens": params["max_num_tokens"] // 2},
            {**params, "max_num_tokens": params["max_num_tokens"] * 2},
            {**params, "kv_fraction": 0.85}, {**params, "kv_fraction": 0.95},
            {**params, "max_batch_size": 512}]


@pytest.mark.parametrize("flat", [True, False])
def test_a_flat_climb_hands_over_to_the_runner_up_however_far_behind(flat):
    attrs = _plan("tp1-pp1-dp8", "tp2-pp1-dp4")
    taken = [_trial("tp1-pp1-dp8", 100.0, -0.1), _trial("tp2-pp1-dp4", 60.0, -0.1)]
    # Three of the leader's neighbours: level with it (its settings do not move it), or not.
    for value in (100.0, 100.0, 100.0) if flat else (100.0, 97.0, 100.0):
        taken.append(_trial(value=value, tpot=-0.1,
                            **next_planned(taken, attrs, lambda p, b: _moves(p))))
    assert {t.params["layout"] for t in taken[2:]} == {"tp1-pp1-dp8"}
    after = next_planned(taken, attrs, lambda p, b: _moves(p))
    assert after["layout"] == ("tp2-pp1-dp4" if flat else "tp1-pp1-dp8")
    if flat:  # the runner-up's own neighbours, before the leader's last two
        assert after == _moves(taken[1].params)[0]


def _out_of_memory(params):
    """A finished trial of ``params`` that did not fit its GPUs."""
    return optuna.trial.create_trial(
        params=params, value=0.0,
        distributions={k: optuna.distributions.CategoricalDistribution([v])
                       for k, v in params.items()},
        constraints={"fits": 1.0, "tpot:p99": 1.0})


def test_a_layout_that_ran_out_of_memory_is_tried_once_with_a_smaller_token_budget():
    attrs = _plan("tp4-pp1-dp1", "tp4-pp1-dp1-adp")
    oom = _out_of_memory(_trial("tp4-pp1-dp1-adp", 0, 0).params)
    taken = [_trial("tp4-pp1-dp1", 100.0, -0.1), oom]
    # Before the leader's climb: the layout that did not fit, with half the token budget ...
    retry = next_planned(taken, attrs, lambda p, b: _steps(p))
    assert retry == {**oom.params, "max_num_tokens": 4096}
    # ... once: out of memory again, the climb goes on without it.
    taken.append(_out_of_memory(retry))
    assert next_planned(taken, attrs, lambda p, b: _steps(p))["layout"] == "tp4-pp1-dp1"


def test_layouts_beyond_a_clearly_worse_replica_size_wait_until_after_the_climb():
    attrs = _plan("tp1-pp1-dp8", "tp8-pp1-dp1", "tp2-pp1-dp4", "tp4-pp1-dp2", "tp2-pp2-dp2")
    tried = [_trial("tp1-pp1-dp8", 100.0, -0.1), _trial("tp8-pp1-dp1", 30.0, -0.1),
             _trial("tp2-pp1-dp4", 60.0, -0.1)]

    def neighbours(params, binding):
        return _steps(params) if params["layout"] == "tp1-pp1-dp8" else []

    # Replicas of two GPUs came out far below those of one: the size-4 layouts, beyond them,
    # are left for after the leader's climb, and then tried rather than dropped.
    step = next_planned(tried, attrs, neighbours)
    assert step["layout"] == "tp1-pp1-dp8" and step["max_num_tokens"] == 4096
    tried += [_trial(value=90.0, tpot=-0.1, **p) for p in _steps(tried[0].params)]
    assert next_planned(tried, attrs, neighbours)["layout"] in {"tp4-pp1-dp2", "tp2-pp2-dp2"}
    # Had the two-GPU replicas been nearly as good, the size-4 ones would have come first.
    close = tried[:2] + [_trial("tp2-pp1-dp4", 98.0, -0.1)]
    assert next_planned(close, attrs, neighbours)["layout"] in {"tp4-pp1-dp2", "tp2-pp2-dp2"}


def test_a_layout_too_slow_for_the_slo_rules_out_the_planned_layouts_that_are_slower(tmp_path):
    # 70B at a TPOT bound only 4 or 8 GPUs of tensor parallelism can meet.
    tight = Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=8, precision="fp8",
                           isl=1024, osl=128, slo="tpot:p99<=16ms")
    space = SearchSpace.from_dict({**SPACE, "pp": [1, 2, 4]})
    tuner = Tuner(tight, space, SimRunner(tight), open_storage(f"sqlite:///{tmp_path / 't.db'}"),
                  "t", seed=0)
    tuner.open()
    plan = [(c.tp, c.pp) for c in startup_configs(space, tuner.layouts, tight.precision)]
    tuner.optimize(len(plan))
    tried = [(t.user_attrs["config"]["tp"], t.user_attrs["config"]["pp"],
              t.constraints["tpot:p99"] <= 0)
             for t in tuner.study.trials]
    missed = [(tp, pp) for tp, pp, met in tried if not met]
    # Every layout the plan skipped is one that can only be slower than a layout that missed.
    skipped = [lay for lay in plan if lay not in [(tp, pp) for tp, pp, _ in tried[:len(plan)]]]
    assert skipped, "nothing was ruled out"
    # (tp=1 has no all-reduces, so only a miss at tp=1 rules it out.)
    for tp, pp in skipped:
        assert any(pp >= mpp and (tp == mtp or 2 <= tp < mtp) for mtp, mpp in missed)
    # ... and the plan reached the layouts that meet the bound sooner than its full order would.
    first_met = next(i for i, (_, _, met) in enumerate(tried) if met)
    fastest = next(i for i, (tp, pp) in enumerate(plan) if tp >= 4 and pp == 1)
    assert first_met < fastest


def test_prior_spreads_over_layouts_best_first():
    def cfg(tp, pp, b):
        return EngineConfig(tp=tp, pp=pp, dp=8 // (tp * pp), max_batch_size=b)

    scored = [Scored(cfg(8, 1, 64), 100.0, True), Scored(cfg(8, 1, 128), 99.0, True),
              Scored(cfg(4, 2, 64), 90.0, True), Scored(cfg(2, 1, 64), 200.0, False),
              Scored(cfg(1, 1, 64), float("-inf"), False)]
    picked = pick_prior(scored, k=3)
    # Feasible first, one per layout, then the next best of any layout.
    assert picked == [cfg(8, 1, 64), cfg(4, 2, 64), cfg(2, 1, 64)]
    assert pick_prior(scored, k=4)[-1] == cfg(8, 1, 128)


def test_sim_prior_picks_configs_the_model_rates_best(scenario):
    space = SearchSpace.from_dict({**SPACE, "max_batch_size": [256], "kv_fraction": [0.9],
                                   "chunked_prefill": [True]})
    layouts = space.layouts(scenario)
    picked = sim_prior(scenario, space, layouts, k=3)
    assert len({(c.tp, c.pp) for c in picked}) == 3
    sim = SimRunner(scenario)

    def value(c):
        swept = measure_ladder(sim, c, scenario.workload, space.concurrency, scenario.slo)
        point, ok = operating_point(swept.points, scenario.slo)
        return point.output_throughput_per_gpu if ok else 0.0

    every = sorted((value(c) for c in space.configs(layouts, scenario.precision)), reverse=True)
    assert value(picked[0]) == pytest.approx(every[0])


class Linear(Runner):
    """A runner whose every latency is the load in milliseconds, and throughput the load."""

    name = "linear"

    def __init__(self, scenario):
        super().__init__(scenario)
        self.runs: list[int] = []

    def measure(self, config, workload, loads):
        (c,) = loads
        self.runs.append(c)
        stats = {s: float(c) for s in ("mean", "p50", "p90", "p95", "p99")}
        return Measurement(self.name, config, workload, (LoadPoint(
            concurrency=c, num_requests=10 * c, request_throughput=float(c),
            output_throughput=float(c), output_throughput_per_gpu=float(c),
            output_throughput_per_user=1.0, duration_s=1.0,
            latency_ms={m: dict(stats) for m in ("ttft", "tpot", "itl", "e2e")}),))


@pytest.mark.parametrize("walk", [measure_ladder, bisect_ladder])
@pytest.mark.parametrize("limit, dp, expected", [(11, 1, 11), (43, 1, 40), (700, 1, 640),
                                                 (1, 1, 1), (11, 4, 8), (27, 4, 24)])
def test_the_operating_point_is_pinned_between_the_ladders_rungs(walk, limit, dp, expected):
    scen = Scenario.build(model="llama-3.1-8b", gpu="h100", num_gpus=4, precision="fp8",
                          isl=128, osl=128, slo=f"tpot:p99<={limit}ms")
    runner = Linear(scen)
    ladder = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    point, ok = operating_point(walk(runner, EngineConfig(dp=dp), scen.workload, ladder,
                                     scen.slo).points, scen.slo)
    # The highest load meeting the SLO, to within 12.5% of it (or one request per replica).
    assert ok and point.concurrency == expected <= limit
    assert limit - point.concurrency <= max(dp, int(point.concurrency * 0.125))
    # ... at no more than three runs past the ladder's own, each a multiple of the replicas
    # (the load is split evenly over them).
    extra = [c for c in runner.runs if c not in ladder]
    assert len(extra) <= 3 and all(c % dp == 0 for c in extra)


def test_an_operating_point_tie_goes_to_the_higher_load(scenario):
    # Eight replicas: loads 1, 2, 4 and 8 all put one request on each, so they measure the same;
    # the point reported must say 8 requests are in flight, not 1.
    config = EngineConfig(tp=1, dp=8)
    runner = SimRunner(Scenario.build(model="llama-3.1-8b", gpu="h100", num_gpus=8,
                                      precision="fp8", isl=1024, osl=128, slo=None))
    points = runner.measure(config, runner.scenario.workload, [1, 2, 4, 8]).load_points
    assert len({p.output_throughput_per_gpu for p in points}) == 1
    point, ok = operating_point(points, scenario.slo)
    assert ok and point.concurrency == 8


@pytest.mark.parametrize("slo", ["tpot:p99<=40ms", "tpot:p99<=12ms", "tpot:p99<=1ms", None])
def test_bisection_finds_the_ladders_operating_point_in_fewer_runs(slo):
    scen = Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=8, precision="fp8",
                          isl=1024, osl=128, slo=slo)
    space = SearchSpace.from_dict(SPACE)
    walked = bisected = 0
    for config in [EngineConfig(tp=8, max_batch_size=256), EngineConfig(tp=2, pp=2, dp=2),
                   EngineConfig(tp=4, dp=2, max_batch_size=32, chunked_prefill=False)]:
        a, b = Counting(scen), Counting(scen)
        pa = measure_ladder(a, config, scen.workload, space.concurrency, scen.slo).points
        pb = bisect_ladder(b, config, scen.workload, space.concurrency, scen.slo).points
        (oa, fa), (ob, fb) = operating_point(pa, scen.slo), operating_point(pb, scen.slo)
        assert fa == fb
        if fa:
            assert ob.output_throughput_per_gpu == pytest.approx(oa.output_throughput_per_gpu,
                                                                 rel=0.02)
        # Off the ladder, only loads between the operating point's rung and the next one.
        if fa:
            rungs = sorted(c for c in space.concurrency if c > 0)
            above = [c for c in rungs if c > ob.concurrency]
            off = {p.concurrency for p in pb} - set(space.concurrency)
            assert all(max(c for c in rungs if c < x) < x < min(above) for x in off)
        # Lowest load, top, then halving, then refining between two rungs (at most 3 runs
        # from 12.5% resolution): a handful of runs. (A tight SLO can stop an ascending walk
        # sooner; that is not where the runs go.)
        assert b.runs <= 2 + math.ceil(math.log2(len(space.concurrency))) + 3
        walked, bisected = walked + a.runs, bisected + b.runs
    if slo is None or slo.endswith("40ms"):
        assert bisected < walked * 0.75  # loose SLOs are where walking up the ladder costs most
