"""How a study spends its trials: a plan for the first ones, then TPE.

Each real trial can cost an hour of eight GPUs, so trials are not left to chance while the
structure of the problem says where to look:

1. **Layouts.** The parallel layout decides most of a configuration's throughput and is the one
   setting TPE cannot learn from neighbours (its choices are unordered). The first trials are one
   per layout, each with the scheduler settings that are good almost everywhere (the largest
   batch limit: the load ladder picks the load anyway; a 16k token budget and TensorRT-LLM's
   default KV share; chunked prefill). With ``--prior sim`` the built-in model's best
   configurations, spread over layouts, take their place. A layout that missed the SLO even at
   its lowest load rules out the planned layouts that can only be slower per request (as many or
   more pipeline stages, as few or fewer tensor-parallel GPUs but at least two): under a tight
   SLO the plan goes straight to the wide ones. Under a latency SLO the order also follows the
   results: once the smallest replicas meet it, the largest next, then the size nearest the best
   so far; the layouts beyond a clearly worse size wait until after the climb (``DEFER``).
   A layout whose trial did not fit its GPUs at those settings is tried once more asking for
   less memory (a smaller token budget first, ``_smaller_after_oom``).
2. **Hill climbing.** Then the best layout is climbed (and a runner-up close behind it,
   ``CLOSE``, beside it): its best configuration (the incumbent) has its neighbours tried, one
   step down and up the token budget, KV share and batch limit, the budget two steps, the other
   chunked-prefill choice, the token budget one or two steps away with the other chunked-prefill
   choice, in the order that what limits the incumbent says pays first (``_MOVES``). A neighbour
   that beats the incumbent by more than 0.5% becomes the incumbent (smaller gains are a real
   engine's run-to-run noise). A leader whose first neighbours all come out level with it
   (``FLAT``: its settings do not move it) hands the climb to the runner-up however far behind.
   The leader's settings are tried on a layout that could overtake it (``_transplant``). When
   no untried neighbour is left, the leader's settings on every other layout that ran (once
   each; one that comes close is climbed), the deferred layouts, then:
3. **TPE** (multivariate, grouped, constant liar so that workers sharing a study don't all
   propose the same point; SLO terms as constraints), which has learned from every trial so far;
   asked again when it proposes a configuration already measured.

The plan is a pure function of the study's trials (and the first configurations stored with the
study), so every worker sharing a study follows the same one; a configuration already proposed
by any worker is never planned again.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import optuna

from autotune.config import DEFAULT_KV_FRACTION, EngineConfig
from autotune.errors import TrialFailure
from autotune.model import Simulator
from autotune.scenario import Scenario
from autotune.slo import FITS
from autotune.space import Layout, SearchSpace
from autotune.sweep import measure_ladder, operating_point

#: How many of the prior's best configurations become the first real trials.
PRIOR_TRIALS = 6


#: Layouts climbed side by side after the first trials, at most (the leader and a runner-up
#: within ``CLOSE``).
CLIMBED_LAYOUTS = 2
#: Smallest relative gain that moves a climb (below it is run-to-run noise on a real engine).
MIN_GAIN = 0.005
#: A runner-up layout is climbed beside the leader only when its best trial is within this share
#: of the leader's: tuning a layout's scheduler settings rarely moves it by more (on the dev
#: sample of benchmarks/search_efficiency.py the best configuration of a layout beat its
#: planned one by 0% at the median, 7% at the 95th percentile), so a layout further behind is
#: not worth half of the climb's trials.
CLOSE = 0.05
#: Trials of the leading layout's neighbours, all level with its incumbent, that make its climb
#: flat: the runner-up is then climbed beside it even when further behind than ``CLOSE``.
FLAT = 3
#: An untried layout is left until after the climb when a replica size between the best layout's
#: and its own has been tried and came out this much below the best: per-GPU throughput peaks at
#: one replica size and falls away on both sides (``_closest_to_the_best``), so the sizes beyond a
#: clearly worse one are unlikely to win, and tried last rather than never.
DEFER = 0.05
#: A configuration whose every SLO term is this far inside its bound at its operating point is
#: limited by capacity, not latency (its load stopped at the ladder's top).
SLACK = 0.2
#: The token budget of the first trial of each layout: twice TensorRT-LLM's default, which long
#: prompts and large batches outgrow (on both samples of benchmarks/search_efficiency.py the
#: climb then had fewer steps to take; the larger budget's activation memory is in the model).
PLAN_MAX_NUM_TOKENS = 16384
#: Fresh draws asked of TPE when it proposes a configuration already tried.
REDRAWS = 10
#: Study user attribute holding the first configurations' params (list of dicts).
PLAN_ATTR = "autotune_plan"
#: Study user attribute: whether the plan may reorder its first configurations.
ADAPTIVE_ATTR = "autotune_plan_adaptive"


def quiet_optuna() -> None:
    """Silence what Optuna prints about the features a study relies on deliberately: its
    per-trial INFO lines, and the ExperimentalWarnings of heartbeats, their retry callback and
    grouped TPE (and the warning about heartbeats kept around ask/tell, which autotune does).
    Called when a study is opened, not on import: reading results changes no global state."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def _proposed(trials: Iterable[optuna.trial.FrozenTrial]) -> set[tuple]:
    """Keys of the configurations ``trials`` stand for (an enqueued one by its fixed params)."""
    return {_key(t.params or t.system_attrs.get("fixed_params", {})) for t in trials}


class PlannedSampler(optuna.samplers.BaseSampler):
    """Proposes the planned configurations (see the module's docstring), then defers to ``base``.

    ``space`` and ``layouts`` give the neighbours of a configuration. The first configurations
    are read from the study's ``PLAN_ATTR`` user attribute (written by whoever created it).
    """

    def __init__(self, base: optuna.samplers.BaseSampler, space: SearchSpace,
                 layouts: Sequence[Layout]):
        self.base, self.space = base, space
        self.layout_labels = [lay.label for lay in layouts]
        self._planned: dict[int, dict] = {}

    # -- the plan
    def next_params(self, study: optuna.Study) -> dict | None:
        """The next planned params for ``study``, or None when the plan is done."""
        return next_planned(study.get_trials(deepcopy=False), study.user_attrs, self.neighbours)

    def neighbours(self, params: dict, binding: str | None = None) -> list[dict]:
        """One step along each setting of ``params`` within its layout, the other
        chunked-prefill choice, and the token budget moved with it, in the order that
        ``binding`` (the metric that limits the configuration, ``_binding``) says pays first."""
        moves: list[tuple[tuple, dict]] = []
        for name, short, values in (("max_num_tokens", "tokens", self.space.max_num_tokens),
                                    ("kv_fraction", "kv", self.space.kv_fraction),
                                    ("max_batch_size", "batch", self.space.max_batch_size),
                                    ("chunked_prefill", "chunk", self.space.chunked_prefill)):
            ordered = sorted(values)
            if params.get(name) not in ordered:
                continue
            i = ordered.index(params[name])
            for step in (-1, 1):
                if 0 <= i + step < len(ordered):
                    kind = (short, 0 if short == "chunk" else step)
                    moves.append((kind, {**params, name: ordered[i + step]}))
        # The token budget and chunked prefill act together (unchunked, a prompt must fit the
        # budget whole, so a budget of one prompt admits one prompt per iteration): each alone
        # can leave the objective flat where both at once move it.
        tokens = sorted(self.space.max_num_tokens)
        if params.get("max_num_tokens") in tokens:  # two steps: past a flat first one
            i = tokens.index(params["max_num_tokens"])
            for step in (-2, 2):
                if 0 <= i + step < len(tokens):
                    moves.append((("tokens", step), {**params, "max_num_tokens": tokens[i + step]}))
        if len(self.space.chunked_prefill) > 1 and params.get("max_num_tokens") in tokens:
            i = tokens.index(params["max_num_tokens"])
            for step in (-1, 1, -2, 2):
                if 0 <= i + step < len(tokens):
                    moves.append((("tokens+chunk", step), {
                        **params, "max_num_tokens": tokens[i + step],
                        "chunked_prefill": not params.get("chunked_prefill")}))
        order = _MOVES.get(binding, _MOVES[None])
        ranked = sorted(range(len(moves)), key=lambda k: (
            order.index(moves[k][0]) if moves[k][0] in order else len(order), k))
        return [moves[k][1] for k in ranked]

    # -- the sampler interface
    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)
        if not trial.system_attrs.get("fixed_params"):  # an enqueued trial has its own params
            planned = self.next_params(study)
            if planned is not None:
                self._planned[trial.number] = planned

    def infer_relative_search_space(self, study, trial):
        if trial.number in self._planned:
            return {}
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        if trial.number in self._planned:
            return {}
        params = self.base.sample_relative(study, trial, search_space)
        if not params or set(params) != set(search_space):
            return params
        # TPE on a space of categoricals keeps proposing configurations already measured (a
        # trial spent on a repeat, even a reused one, teaches nothing): draw again, and if it
        # insists, step to an untried neighbour of its choice.
        proposed = _proposed(t for t in study.get_trials(deepcopy=False)
                             if t.number != trial.number)
        for _ in range(REDRAWS):
            if _key(params) not in proposed:
                return params
            params = self.base.sample_relative(study, trial, search_space)
        if _key(params) in proposed:
            untried = [p for p in self.neighbours(params) if _key(p) not in proposed]
            if untried:
                params = untried[trial.number % len(untried)]
        return params

    def sample_independent(self, study, trial, param_name, param_distribution):
        planned = self._planned.get(trial.number)
        if planned is not None and param_name in planned:
            return planned[param_name]
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._planned.pop(trial.number, None)
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


#: The order the climb tries an incumbent's neighbours in, by what limits it (``_binding``; other
#: metrics and none: None): a move is (setting, steps up the sorted choices; 0 for the
#: chunked-prefill flip). A larger token budget prefills more per iteration (first tokens sooner,
#: more throughput, each decode step slower), unchunked prompts start decoding sooner and chunked
#: ones stall the decoding less; a larger KV share only adds room (never fewer
#: requests in flight), so its step down comes last.
_MOVES: dict[str | None, list[tuple[str, int]]] = {
    None: [("tokens", 1), ("batch", 1), ("kv", 1), ("chunk", 0), ("tokens+chunk", 1),
           ("tokens", -1), ("batch", -1), ("tokens+chunk", -1), ("tokens+chunk", 2),
           ("tokens+chunk", -2), ("tokens", 2), ("tokens", -2), ("kv", -1)],
    "ttft": [("tokens", 1), ("tokens+chunk", 1), ("chunk", 0), ("tokens+chunk", 2),
             ("kv", 1), ("batch", 1), ("tokens", -1), ("tokens+chunk", -1),
             ("tokens+chunk", -2), ("batch", -1), ("tokens", 2), ("tokens", -2),
             ("kv", -1)],
    "tpot": [("tokens", -1), ("chunk", 0), ("tokens+chunk", -1), ("tokens+chunk", -2),
             ("kv", 1), ("batch", -1), ("batch", 1), ("tokens", 1), ("tokens+chunk", 1),
             ("tokens+chunk", 2), ("tokens", -2), ("tokens", 2),
             ("kv", -1)],
}
_MOVES["itl"] = _MOVES["tpot"]
#: A configuration that misses a first-token bound even at its lowest load: which way the token
#: budget helps there depends on the prompts (a long one prefills faster whole; whole long
#: prompts hold the ones behind them back), so both ways first.
#: A configuration that did not fit its GPUs: less memory asked for, the token budget's
#: activations first.
_MOVES["oom"] = [("tokens", -1), ("tokens", -2), ("kv", -1), ("batch", -1)]
_MOVES["miss"] = [("tokens", -1), ("tokens", 1), ("tokens", -2), ("tokens", 2), ("chunk", 0),
                  ("tokens+chunk", -1), ("tokens+chunk", 1), ("tokens+chunk", -2),
                  ("tokens+chunk", 2), ("kv", 1), ("batch", -1), ("batch", 1), ("kv", -1)]


def _binding(trial: optuna.trial.FrozenTrial) -> str | None:
    """The latency metric that limits ``trial``'s configuration: the SLO term nearest its bound
    (or furthest past it), None when every term has room (``SLACK``) or there is no SLO;
    "miss" for a first-token (or end-to-end) bound missed even at the lowest load."""
    terms = {k: v for k, v in trial.constraints.items() if k != FITS}
    if not terms:
        return None
    name = max(terms, key=terms.__getitem__)
    metric = name.split(":")[0]
    if terms[name] > 0 and metric not in ("tpot", "itl"):
        return "miss"
    return metric if terms[name] > -SLACK else None


def next_planned(trials: Sequence[optuna.trial.FrozenTrial], attrs: Mapping,
                 neighbours: Callable[[dict, str | None], list[dict]]) -> dict | None:
    """The plan as a pure function: the next planned params given a study's ``trials`` and its
    user attributes ``attrs`` (the first configurations, ``PLAN_ATTR``), or None when the plan
    is done. ``neighbours(params, binding)`` lists the one-step neighbours of a configuration,
    in the order that pays first when ``binding`` (a latency metric, or None) limits it."""
    proposed = _proposed(trials)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    too_slow = [Layout.parse(t.params["layout"]) for t in done
                if "layout" in t.params and _too_slow(t)]
    todo = [p for p in attrs.get(PLAN_ATTR, []) if _key(p) not in proposed
            and not (p.get("layout") and any(_slower(Layout.parse(p["layout"]), slow)
                                             for slow in too_slow))]
    # (A layout ruled out as too slow is left to TPE; the plan spends no trial on it.)
    scored = [t for t in done if "layout" in t.params]
    adaptive = bool(attrs.get(ADAPTIVE_ATTR))
    if todo and not adaptive:
        return todo[0]
    now = _not_deferred(todo, scored)
    if now:
        return _closest_to_the_best(now, scored)
    by_layout: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in done:
        by_layout.setdefault(t.params.get("layout"), []).append(t)
    retry = _smaller_after_oom(by_layout, proposed, neighbours)
    if retry is not None:
        return retry
    incumbents = sorted((_incumbent(ts) for ts in by_layout.values()), key=_rank, reverse=True)
    # The leader is climbed, and beside it a runner-up close enough that tuning may put it
    # ahead (a layout a little behind at default settings is sometimes the one that wins).
    # A leader whose neighbours all came out the same (``FLAT``) is at what its layout gives
    # whatever the settings: the runner-up takes over its climb however far behind (the
    # leader's untried neighbours wait for the runner-up's).
    flat = _flat(incumbents[0], by_layout.get(incumbents[0].params.get("layout"), []))
    leaders = incumbents[:1] + [t for t in incumbents[1:CLIMBED_LAYOUTS]
                                if _close(t, incumbents[0]) or (flat and _rank(t)[0])]
    waits = flat and len(leaders) > 1
    transplant = _transplant(incumbents, proposed)
    if transplant is not None:
        return transplant
    best_next, fewest = None, None
    for leader in leaders:  # the leader whose neighbourhood has been tried least goes next
        around = neighbours(leader.params, _binding(leader))
        untried = [p for p in around if _key(p) not in proposed]
        tried = len(around) - len(untried) + (len(around) if waits and leader is leaders[0]
                                              else 0)
        if untried and (fewest is None or tried < fewest):
            best_next, fewest = untried[0], tried
    if best_next is None:
        # The climb is done: the leader's settings on every layout behind it, however far (a
        # layout whose first trial ran at settings wrong for it, a token budget too large for
        # a tight TPOT bound say, can be the best one at the leader's); one that comes close
        # is climbed in turn.
        best_next = _transplant(incumbents, proposed, every=True)
    if best_next is None and todo:  # the layouts left until after the climb
        return _closest_to_the_best(todo, scored)
    return best_next


def _smaller_after_oom(by_layout: Mapping[str, Sequence[optuna.trial.FrozenTrial]],
                       proposed: set[tuple],
                       neighbours: Callable[[dict, str | None], list[dict]]) -> dict | None:
    """A layout whose one trial did not fit its GPUs, tried once more with less memory asked
    for (``_MOVES["oom"]``: a smaller token budget first). The plan's first settings are sized
    for throughput (a 16k token budget's activations, a large KV share); that they do not fit
    says nothing about the layout at smaller ones, and an attention-DP layout (each rank
    holding a whole budget's activations) is often the best one at high load."""
    for layout, trials in by_layout.items():
        if layout is None or len(trials) != 1 or _fits(trials[0]):
            continue
        untried = [p for p in neighbours(trials[0].params, "oom") if _key(p) not in proposed]
        if untried:
            return untried[0]
    return None


def _transplant(incumbents: Sequence[optuna.trial.FrozenTrial], proposed: set[tuple],
                every: bool = False) -> dict | None:
    """The leader's settings on another layout that could overtake it: one close behind it, or
    one faster that missed the SLO (``every``: any other layout that ran). What made the leader
    meet the SLO or gain (a smaller token budget that stops long prompts delaying first tokens,
    say) usually does the same on the other layouts, and one trial tells."""
    if not incumbents:
        return None
    leader = incumbents[0]
    feasible, value = _rank(leader)
    settings = {k: v for k, v in leader.params.items() if k != "layout"}
    for t in incumbents[1:]:
        candidate = {**settings, "layout": t.params.get("layout")}
        if candidate["layout"] is None or _key(candidate) in proposed:
            continue
        faster_but_missed = feasible and not _rank(t)[0] and _fits(t) and t.value > value
        if faster_but_missed or (feasible and ((every and _fits(t)) or _close(t, leader))):
            return candidate
    return None


def _flat(incumbent: optuna.trial.FrozenTrial,
          trials: Sequence[optuna.trial.FrozenTrial]) -> bool:
    """Whether ``FLAT`` or more other trials of the incumbent's layout all came out level with
    it (within ``MIN_GAIN``, as feasible or not as it): the layout's settings do not move it
    (its operating point sits where the SLO or the model's size puts it)."""
    others = [t for t in trials if t is not incumbent]
    if len(others) < FLAT:
        return False
    (fi, vi) = _rank(incumbent)
    return all(_rank(t)[0] == fi and abs(_rank(t)[1] - vi) <= MIN_GAIN * max(abs(vi), 1e-9)
               for t in others)


def _fits(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.constraints.get(FITS, 0.0) <= 0


def _close(trial: optuna.trial.FrozenTrial, leader: optuna.trial.FrozenTrial) -> bool:
    """Whether ``trial`` is near enough ``leader`` to be climbed beside it (``CLOSE``); before
    anything meets the SLO, every runner-up is."""
    (fl, vl), (ft, vt) = _rank(leader), _rank(trial)
    if not fl:
        return True
    return ft and vt >= vl * (1 - CLOSE)


def _not_deferred(todo: list[dict], done: Sequence[optuna.trial.FrozenTrial]) -> list[dict]:
    """The planned layouts to try before the climb: all but those beyond a clearly worse
    replica size (``DEFER``) as seen from the best trial's size."""
    feasible = [t for t in done if _rank(t)[0]]
    if not feasible:
        return todo
    best = max(feasible, key=_rank)
    best_size = math.log2(_replica_size(best.params))
    by_size: dict[float, float] = {}
    for t in done:
        size = math.log2(_replica_size(t.params))
        value = t.value if _rank(t)[0] else 0.0
        by_size[size] = max(by_size.get(size, 0.0), value)
    worse = [s for s, v in by_size.items() if v < best.value * (1 - DEFER)]

    def beyond_a_worse_size(params: dict) -> bool:
        size = math.log2(_replica_size(params))
        return any(min(best_size, size) < s < max(best_size, size) for s in worse)

    return [p for p in todo if not beyond_a_worse_size(p)]


def _incumbent(trials: Sequence[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
    """The trial a climb starts from: the first one, replaced only by a trial that beats it by
    more than ``MIN_GAIN`` (chasing 0.1% gains, within a real engine's run-to-run noise, would
    spend the budget on one layout)."""
    best = trials[0]
    for t in trials[1:]:
        (fa, va), (fb, vb) = _rank(t), _rank(best)
        if fa != fb:
            if fa:
                best = t
        elif va > vb + MIN_GAIN * max(abs(vb), 1e-9):
            best = t
    return best


def _replica_size(params: dict) -> int:
    lay = Layout.parse(params["layout"])
    return lay.tp * lay.pp


def _closest_to_the_best(todo: list[dict], done: Sequence[optuna.trial.FrozenTrial]) -> dict:
    """The next one-per-layout trial under a latency SLO.

    Until some layout meets the SLO, the plan's order (smallest replicas first; the layouts
    ruled out as too slow are already gone). If the very first one meets it, the largest
    replicas next; then the replica size closest to the best trial's (in powers of two).
    Throughput per GPU under an SLO peaks at one replica size and falls away on both sides
    (small replicas are slow per request, large ones pay for their all-reduces), so the two
    ends tell which way to go; ties keep the plan's order.
    """
    feasible = [t for t in done if _rank(t)[0]]
    if not feasible:
        return todo[0]
    if len(done) == 1:
        return max(todo, key=_replica_size)
    target = math.log2(_replica_size(max(feasible, key=_rank).params))
    return min(todo, key=lambda p: abs(math.log2(_replica_size(p)) - target))


def _too_slow(trial: optuna.trial.FrozenTrial) -> bool:
    """The trial ran but missed the SLO at every load, the lowest included (latency only grows
    with load), so its layout is too slow per request whatever the scheduler settings."""
    c = trial.constraints
    return c.get(FITS, 0.0) <= 0 and any(v > 0 for k, v in c.items() if k != FITS)


def _slower(layout: Layout, than: Layout) -> bool:
    """Whether ``layout``'s replicas are at best as fast per request as ``than``'s.

    At the lowest load a request's tokens cross every pipeline stage in turn, so more stages
    only add sends; fewer tensor-parallel GPUs leave each with more weights to read and more
    FLOPs. The exception is tp=1, which has no all-reduces at all (a small model on one GPU can
    beat it on two), so it is never ruled out by a wider layout.
    """
    if layout.pp < than.pp:
        return False
    return layout.tp == than.tp or 2 <= layout.tp < than.tp


def _rank(trial: optuna.trial.FrozenTrial) -> tuple:
    """Order of merit: feasible first, then by value; infeasible by how far they miss."""
    worst = max(trial.constraints.values(), default=0.0)
    feasible = worst <= 0
    return (feasible, trial.value if feasible else -worst)


def make_sampler(space: SearchSpace, layouts: Sequence[Layout], seed: int | None = None
                 ) -> PlannedSampler:
    """The study's sampler (the same for every worker, each with its own seed)."""
    quiet_optuna()
    tpe = optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, constant_liar=True,
        n_startup_trials=min(10, max(4, space.size(list(layouts)) // 20)),
    )
    return PlannedSampler(tpe, space, layouts)


def plan_study(study: optuna.Study, configs: Sequence[EngineConfig], adaptive: bool = False
               ) -> None:
    """Store the first configurations to try with the study (its creator does this once).

    ``adaptive``: they are one per layout (``startup_configs``) under a latency SLO, and the
    plan may take them in the order the results so far suggest; otherwise (no latency bound, or
    the model's prior) in the order given.
    """
    study.set_user_attr(PLAN_ATTR, [SearchSpace.params_of(c) for c in configs])
    study.set_user_attr(ADAPTIVE_ATTR, adaptive)


def _nearest(choices: Iterable, target):
    return min(choices, key=lambda v: (abs(v - target), -v))


def startup_configs(space: SearchSpace, layouts: Sequence[Layout], precision: str,
                    latency_bound: bool = True) -> list[EngineConfig]:
    """One configuration per layout with the settings that are good almost everywhere.

    ``latency_bound``: whether the SLO bounds latency at all (it orders the layouts).
    """
    batch = max(space.max_batch_size)
    tokens = _nearest(space.max_num_tokens, PLAN_MAX_NUM_TOKENS)
    kv = _nearest(space.kv_fraction, DEFAULT_KV_FRACTION)
    chunked = True if True in space.chunked_prefill else space.chunked_prefill[0]
    # Fewest GPUs per replica first: when the trial budget runs out early, the cheap layouts
    # (often the best throughput) have been seen. Among replicas of one size, under a latency
    # bound the fewest pipeline stages first (a request crosses them in turn); without one the
    # most (a stage sends its activations once, where TP all-reduces twice per layer).
    ordered = sorted(layouts, key=lambda lay: (lay.tp * lay.pp,
                                               lay.pp if latency_bound else -lay.pp))
    return [EngineConfig(lay.tp, lay.pp, lay.dp, batch, tokens, kv, chunked, precision, lay.ep,
                         lay.attention_dp)
            for lay in ordered]


@dataclass(frozen=True)
class Scored:
    """A configuration and the model's objective for it (output tok/s per GPU; -inf if it
    cannot run), and whether the model says it meets the SLO."""

    config: EngineConfig
    objective: float
    feasible: bool


def score_space(configs: Iterable[EngineConfig],
                evaluate: Callable[[EngineConfig], tuple[float, bool]],
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
        lay = s.config.layout_label()
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
              k: int = PRIOR_TRIALS, progress: Callable[[int], None] | None = None,
              engine: str | None = None) -> list[EngineConfig]:
    """Score the whole space with the built-in model and pick the first real trials.

    ``engine``: the runner's name (``trtllm``, ``vllm``): its own fitted constants; None or
    another name (``sim``): TensorRT-LLM's."""
    from autotune.model import ENGINES

    sim = Simulator(scenario.model, scenario.gpu, scenario.calibration,
                    engine=engine if engine in ENGINES else None)

    def evaluate(config: EngineConfig) -> tuple[float, bool]:
        swept = measure_ladder(sim, config, scenario.workload, space.concurrency, scenario.slo)
        point, feasible = operating_point(swept.points, scenario.slo)
        return point.output_throughput_per_gpu, feasible

    scored = score_space(space.configs(list(layouts), scenario.precision), evaluate, progress)
    return pick_prior(scored, k)


__all__ = ["ADAPTIVE_ATTR", "PLAN_ATTR", "PRIOR_TRIALS", "PlannedSampler", "Scored", "make_sampler",
           "next_planned", "pick_prior", "plan_study", "quiet_optuna", "score_space", "sim_prior",
           "startup_configs"]
