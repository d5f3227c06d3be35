"""The study round trip through a real SQLite file: propose, measure, record, reopen, recommend."""

import time

import optuna
import pytest

from autotune.config import EngineConfig
from autotune.errors import Crashed, ScenarioMismatch, UserError
from autotune.measurement import MAX_CONCURRENCY, Status
from autotune.recommend import Results
from autotune.runners.sim import SimRunner
from autotune.scenario import Scenario
from autotune.slo import FITS
from autotune.space import SearchSpace
from autotune.study import Tuner, memory_gate, open_storage
from autotune.sweep import evaluate

SPACE = {"tp": [1, 2, 4, 8], "pp": [1, 2], "max_batch_size": [32, 256],
         "max_num_tokens": [4096, 8192], "kv_fraction": [0.9], "chunked_prefill": [True],
         "concurrency": [1, 8, 64, "max"]}


@pytest.fixture
def scenario():
    return Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=8, precision="fp8",
                          isl=1024, osl=128, slo="tpot:p99<=40ms")


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'study.db'}"


def run(scenario, url, trials, runner=None, name="s", seed=0):
    db = open_storage(url)
    tuner = Tuner(scenario, SearchSpace.from_dict(SPACE), runner or SimRunner(scenario), db,
                  name, seed=seed)
    tuner.open()
    tuner.optimize(trials)
    return tuner, db


def test_round_trip_records_every_trial_and_best_is_the_max_feasible(scenario, url):
    tuner, _ = run(scenario, url, 12)
    db = open_storage(url, create=False)  # a fresh connection, as `autotune best` makes
    results = Results(db.store, "s")
    rows = db.store.measurements("s")
    assert len(rows) == 12 == len(tuner.study.trials)
    assert {r.trial_number for r in rows} == set(range(12))
    measured = [r for r in rows if r.status == "ok"]
    assert measured and all(r.load_points for r in measured)
    (best,) = results.best(1)
    feasible = [r.objective for r in measured if r.feasible]
    assert best.point.output_throughput_per_gpu == pytest.approx(max(feasible))
    assert all(t.met for t in best.terms)
    # The Optuna side agrees: same best value, constraints on every trial, a feasible attr.
    assert tuner.study.best_value == pytest.approx(max(feasible))
    for t in tuner.study.trials:
        assert set(t.constraints) == {FITS, "tpot:p99"}
        assert t.user_attrs["feasible"] == all(v <= 0 for v in t.constraints.values())


def test_operating_point_is_the_highest_throughput_load_meeting_the_slo(scenario, url):
    run(scenario, url, 8)
    db = open_storage(url, create=False)
    for m in db.store.measurements("s", ("ok",)):
        meeting = [p for p in m.load_points if scenario.slo.met(p)]
        if m.feasible:
            assert m.operating_point == max(meeting, key=lambda p: p.output_throughput_per_gpu)
        else:
            assert not meeting
        # The ladder stops at the first load that misses the SLO.
        misses = [p for p in m.load_points if not scenario.slo.met(p)]
        assert len(misses) <= 1 and (not misses or misses[0] is m.load_points[-1])


def test_load_points_say_what_was_in_flight_over_the_replicas(scenario, url):
    run(scenario, url, 8)
    rows = open_storage(url, create=False).store.measurements("s", ("ok",))
    replicated = [m for m in rows if m.config.dp > 1]
    assert replicated
    for m in replicated:
        loads = [p.concurrency for p in m.load_points if p.concurrency != MAX_CONCURRENCY]
        # Each replica gets ceil(c / dp): only multiples of dp are ever in flight.
        assert loads and all(c % m.config.dp == 0 for c in loads), (m.config.label(), loads)
        assert len(loads) == len(set(loads))


def test_second_search_continues_the_study_up_to_its_total(scenario, url):
    run(scenario, url, 6)
    tuner, db = run(scenario, url, 10)
    assert len(tuner.study.trials) == 10
    assert len(db.store.measurements("s")) == 10


def test_same_config_is_reused_not_measured_again(scenario, url):
    calls = []

    class Counting(SimRunner):
        def measure(self, config, workload, loads):
            calls.append(config)
            return super().measure(config, workload, loads)

    run(scenario, url, 40, runner=Counting(scenario))
    db = open_storage(url, create=False)
    rows = db.store.measurements("s")
    reused = [r for r in rows if r.status == "reused"]
    assert reused, "40 trials over a 32-config space must repeat a config"
    by_id = {r.id: r for r in rows}
    for r in reused:
        assert by_id[r.reused_from].key == r.key and not r.load_points
    measured_keys = [r.key for r in rows if r.status in ("ok", "infeasible")]
    assert len(measured_keys) == len(set(measured_keys))
    assert len({c for c in calls}) == len([r for r in rows if r.status == "ok"])


def test_failing_trial_is_recorded_with_its_reason_and_the_search_goes_on(scenario, url):
    class BrokenPP2(SimRunner):
        def measure(self, config, workload, loads):
            if config.pp == 2:
                raise Crashed("worker 3 died: NCCL error", log_tail="NCCL WARN timeout")
            return super().measure(config, workload, loads)

    tuner, db = run(scenario, url, 20, runner=BrokenPP2(scenario))
    rows = db.store.measurements("s")
    failed = [r for r in rows if r.status == "failed"]
    assert failed and all(r.config.pp == 2 for r in failed)
    assert all(r.failure_class == "crashed" and "NCCL" in r.message and r.log_tail
               for r in failed)
    states = {t.number: t.state for t in tuner.study.trials}
    assert all(states[r.trial_number] == optuna.trial.TrialState.FAIL for r in failed)
    assert any(r.status == "ok" for r in rows)
    assert tuner.finished() == 20


class RecordingEngine(SimRunner):
    """Stands in for a real engine: not the model's own runner, so the study puts only the
    "cannot run at all" gate in front of it; it remembers what it was asked to run."""

    name = "engine"
    predicts = False

    def __init__(self, scenario):
        super().__init__(scenario)
        self.ran = []

    def measure(self, config, workload, loads):
        self.ran.append(config)
        return super().measure(config, workload, loads)


BF16_70B = dict(model="llama-3.1-70b", gpu="h100", num_gpus=8, precision="bf16", isl=1024,
                osl=128, slo=None)


def test_config_that_cannot_fit_is_infeasible_without_running(url):
    """70B in BF16 is 141 GB: on one 80 GB H100 it cannot run, and no trial ever runs it;
    near the edge (two GPUs, a large token budget) the engine decides, not the model."""
    scen = Scenario.build(**BF16_70B)
    space = SearchSpace.from_dict(SPACE | {"tp": [1, 2], "pp": [1],
                                           "max_num_tokens": [4096, 65536]})
    engine = RecordingEngine(scen)
    tuner = Tuner(scen, space, engine, open_storage(url), "bf16", seed=0)
    assert [lay.label for lay in tuner.layouts] == ["tp2-pp1-dp4"]  # tp1 dropped up front
    tuner.open()
    tuner.optimize(space.size(tuner.layouts))
    assert engine.ran and all(c.tp == 2 for c in engine.ran)
    # The model predicts no KV cache with a 64K token budget on two GPUs, yet the engine was
    # asked, and its own answer (here: out of memory) is what the study records.
    edge = [c for c in engine.ran if not engine.model.perf(c).memory().fits]
    assert edge
    rows = open_storage(url, create=False).store.measurements("bf16")
    assert {r.status for r in rows if r.config in edge} == {Status.INFEASIBLE}
    assert {r.failure_class for r in rows if r.config in edge} == {"oom"}


def test_the_gate_records_a_prediction_not_a_measurement():
    """The gate in front of a real engine: weights that cannot fit are ruled out without a
    run, and recorded as the model's prediction, never as an out-of-memory the engine saw."""
    scen = Scenario.build(**BF16_70B)
    engine = RecordingEngine(scen)
    outcome = evaluate(engine, EngineConfig(tp=1, dp=8, precision="bf16"), scen.workload,
                       (1, 8), scen.slo, gate=memory_gate(scen))
    assert outcome.status == Status.PREDICTED and not engine.ran
    assert outcome.failure.failure_class == "predicted_oom" and not outcome.feasible
    assert "predicts" in str(outcome.failure)
    ran = evaluate(engine, EngineConfig(tp=2, dp=4, precision="bf16"), scen.workload, (1, 8),
                   scen.slo, gate=memory_gate(scen))
    assert ran.status == Status.OK and engine.ran


def test_joining_with_another_scenario_is_refused_by_name(scenario, url):
    run(scenario, url, 2)
    other = Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=8, precision="fp8",
                           isl=2048, osl=128, slo="tpot:p99<=40ms")
    db = open_storage(url)
    tuner = Tuner(other, SearchSpace.from_dict(SPACE), SimRunner(other), db, "s")
    with pytest.raises(ScenarioMismatch, match="workload"):
        tuner.open()
    assert len(db.store.measurements("s")) == 2


def test_a_gpu_yaml_by_a_catalog_name_with_other_figures_is_another_scenario(
        scenario, url, tmp_path):
    """A custom GPU file called h100 with half the bandwidth cannot join an H100 study: its
    results would stand for hardware the study is not about."""
    import yaml

    from autotune.specs import load_gpu

    run(scenario, url, 2)
    spec = load_gpu("h100").to_dict()
    custom = tmp_path / "h100.yaml"
    custom.write_text(yaml.safe_dump({**spec, "mem_bw_tb_s": spec["mem_bw_tb_s"] / 2}))
    other = Scenario.build(model="llama-3.1-70b", gpu=str(custom), num_gpus=8, precision="fp8",
                           isl=1024, osl=128, slo="tpot:p99<=40ms")
    assert other.gpu.name == "h100"
    db = open_storage(url)
    tuner = Tuner(other, SearchSpace.from_dict(SPACE), SimRunner(other), db, "s")
    with pytest.raises(ScenarioMismatch, match="gpu mem_bw_tb_s: study has 3.35"):
        tuner.open()
    # The same figures under the same name join.
    same = tmp_path / "same" / "h100.yaml"
    same.parent.mkdir()
    same.write_text(yaml.safe_dump(spec))
    again = Scenario.build(model="llama-3.1-70b", gpu=str(same), num_gpus=8, precision="fp8",
                           isl=1024, osl=128, slo="tpot:p99<=40ms")
    Tuner(again, SearchSpace.from_dict(SPACE), SimRunner(again), db, "s").open()


def test_unknown_study_names_the_ones_that_exist(scenario, url):
    run(scenario, url, 1)
    db = open_storage(url, create=False)
    with pytest.raises(UserError, match="studies here: s"):
        Results(db.store, "nope")


def test_a_trial_broken_by_an_unexpected_error_frees_its_config(scenario, url):
    """A runner error that is no TrialFailure (a full disk) ends the trial unrecorded; the
    re-queued copy of its config must not wait for the dead trial's claim."""
    class BreaksOnce(SimRunner):
        broke = False

        def measure(self, config, workload, loads):
            if not BreaksOnce.broke:
                BreaksOnce.broke = True
                raise OSError(28, "No space left on device")
            return super().measure(config, workload, loads)

    db = open_storage(url)
    space = SearchSpace.from_dict(SPACE)
    tuner = Tuner(scenario, space, BreaksOnce(scenario), db, "s", seed=0)
    tuner.open()
    with pytest.raises(OSError):
        tuner.optimize(3)
    again = Tuner(scenario, space, SimRunner(scenario), open_storage(url), "s", seed=0)
    again.open()
    again.optimize(3, timeout=60)
    assert again.finished() == 3  # the re-queued config was measured, not waited for


def test_bisection_stays_consistent_when_capacity_appears_late():
    """A real engine may report how many requests fit only after some runs: the ladder then
    shrinks mid-bisection, and the search must go on over what is left."""
    from autotune.measurement import Measurement
    from autotune.sweep import bisect_ladder

    scen = Scenario.build(model="llama-3.1-8b", gpu="h100", num_gpus=8, precision="fp8",
                          isl=512, osl=64, slo="tpot:p99<=40ms")
    sim = SimRunner(scen)

    class LateCapacity:
        expensive = True
        runs = 0

        def measure(self, config, workload, loads):
            m = sim.measure(config, workload, loads)
            LateCapacity.runs += 1
            fit = 16 if LateCapacity.runs >= 3 else 0  # unknown for the first two runs
            return Measurement(m.runner, m.config, m.workload, m.load_points, fit, m.raw)

    ladder = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, MAX_CONCURRENCY)
    config = EngineConfig(tp=8, precision="fp8")
    swept = bisect_ladder(LateCapacity(), config, scen.workload, ladder, scen.slo)
    loads = [p.concurrency for p in swept.points]
    assert len(loads) == len(set(loads)) >= 3 and loads[0] == 1
    # Once 16 requests are known to fit, no higher load is bisected towards (only "max").
    assert all(c <= 16 for c in loads[2:] if c != MAX_CONCURRENCY), loads


class _FlakyStorage:
    """A storage whose heartbeats fail as a database under faults does: ``failures`` calls
    raise (Optuna's StorageInternalError, or SQLAlchemy's OperationalError), then all succeed."""

    def __init__(self, failures: list[Exception]):
        self.failures = list(failures)
        self.beats = 0

    def record_heartbeat(self, trial_id: int) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.beats += 1


def _db_errors(n: int) -> list[Exception]:
    from sqlalchemy.exc import OperationalError

    return [optuna.exceptions.StorageInternalError("database is locked") if i % 2 else
            OperationalError("UPDATE trial_heartbeats", {}, Exception("server closed the "
                                                                        "connection"))
            for i in range(n)]


def test_heartbeats_outlive_database_errors(monkeypatch):
    from autotune.study import Heartbeat

    monkeypatch.setattr(Heartbeat, "FIRST_BEAT_BACKOFF_S", (0.01,) * 5)
    storage = _FlakyStorage(_db_errors(3))  # the first beat fails twice, then a later one
    with Heartbeat(storage, trial_id=1, interval_s=0.02) as hb:
        assert storage.beats == 1  # the first beat was retried until it was recorded
        time.sleep(0.3)
        assert hb._thread.is_alive()  # no error killed the beating thread
    assert storage.beats >= 5 and not storage.failures


def test_a_first_beat_the_database_never_takes_fails_the_trial_start(monkeypatch):
    from autotune.study import Heartbeat

    monkeypatch.setattr(Heartbeat, "FIRST_BEAT_BACKOFF_S", (0.01,) * 3)
    storage = _FlakyStorage(_db_errors(10))
    with pytest.raises(optuna.exceptions.StorageInternalError), \
            Heartbeat(storage, trial_id=1, interval_s=0.02):
        pass
