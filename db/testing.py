"""A conformance suite any Store back end must pass (``autotune.db.testing``).

Subclass :class:`StoreContract` in a test module and give it a ``url`` fixture: the SQLAlchemy
URL of an empty database. Every test builds its Store the way autotune does (``parse_url``,
``engine_kwargs``, SQLite's write lock, ``ensure_schema``) and checks the behaviour promised by
the Store's docstring ("Concurrency contract") through its public methods only, including the
races: several threads share one Store (one engine, a connection each) and meet at a barrier.

This module imports pytest: import it from tests only.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from sqlalchemy import create_engine

from autotune.config import EngineConfig
from autotune.db import (
    Store,
    StoredMeasurement,
    engine_kwargs,
    install_sqlite_write_lock,
    parse_url,
)
from autotune.errors import ScenarioMismatch
from autotune.measurement import REUSABLE, LoadPoint, Status
from autotune.scenario import Scenario
from autotune.specs import Workload

STUDY = "contract-study"
OTHER_STUDY = "contract-other"
SPACE = {"tp": [1, 2, 4, 8], "max_batch_size": {"low": 1, "high": 2048, "log": True}}
VERSIONS = {"autotune": "0.0-test"}
#: How long the reaping tests wait for a slot to go stale, and the grace period they reap with.
STALE_AFTER_S = 0.2
WAIT_S = 0.3
THREADS = 8
JOIN_TIMEOUT_S = 30


def scenario(**overrides) -> dict:
    """A valid scenario identity (Llama-3.1-8B FP8 on 8xH100); ``overrides`` change its build."""
    args = {"model": "llama-3.1-8b", "gpu": "h100", "num_gpus": 8, "precision": "fp8",
            "isl": 128, "osl": 16, "slo": None}
    args.update(overrides)
    return Scenario.build(**args).identity()


def race(n: int, fn: Callable[[int], object]) -> list:
    """Run ``fn(i)`` in ``n`` threads released together by a barrier; their results in thread
    order. An exception in any thread fails the caller."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT_S)
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), name=f"contract-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S  # one deadline for all, not one each
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a racing thread did not finish (deadlock?)"
    if errors:
        raise errors[0]
    return results


def point(concurrency: int, per_gpu: float) -> LoadPoint:
    return LoadPoint(
        concurrency=concurrency, num_requests=4 * concurrency, request_throughput=1.5 * concurrency,
        output_throughput=8 * per_gpu, output_throughput_per_gpu=per_gpu,
        output_throughput_per_user=per_gpu / concurrency, duration_s=12.5,
        latency_ms={"ttft": {"p50": 10.0, "p99": 25.5}, "tpot": {"p50": 4.0, "p99": 6.25}})


def measurement(study: str = STUDY, key: str = "key-a", status: Status = Status.OK,
                trial_number: int = 0, **fields) -> StoredMeasurement:
    values = {"study_name": study, "trial_number": trial_number, "runner": "sim", "key": key,
              "config": EngineConfig(tp=2, dp=4, max_batch_size=256, kv_fraction=0.85),
              "workload": Workload(isl=128, osl=16), "status": status}
    values.update(fields)
    return StoredMeasurement(**values)


class StoreContract:
    """Tests every Store back end must pass; subclasses provide the ``url`` fixture."""

    # ---- fixtures -------------------------------------------------------------------------
    @pytest.fixture
    def url(self) -> str:
        """The SQLAlchemy URL of an empty database (override in the back end's test class)."""
        raise NotImplementedError(f"{type(self).__name__} must define the `url` fixture")

    def _open(self, url: str):
        parsed = parse_url(url)
        engine = create_engine(parsed, **engine_kwargs(parsed))
        install_sqlite_write_lock(engine)
        store = Store(engine)
        store.ensure_schema()
        return engine, store

    @pytest.fixture
    def store(self, url):
        engine, store = self._open(url)
        yield store
        engine.dispose()

    @pytest.fixture
    def second_store(self, url, store):
        """Another worker's Store: its own engine on the same database."""
        engine, other = self._open(url)
        yield other
        engine.dispose()

    @pytest.fixture
    def study(self, store) -> str:
        assert store.register_study(STUDY, scenario(), SPACE, VERSIONS) is True
        return STUDY

    # ---- schema ---------------------------------------------------------------------------
    def test_schema_created_and_idempotent(self, store, second_store):
        assert store.has_schema()
        store.ensure_schema()  # a second worker starting on the same database
        second_store.ensure_schema()
        assert store.study_names() == []

    # ---- studies --------------------------------------------------------------------------
    def test_register_study_once(self, store, second_store):
        assert store.register_study(STUDY, scenario(), SPACE, VERSIONS) is True
        assert store.register_study(STUDY, scenario(), SPACE, VERSIONS) is False
        assert second_store.register_study(STUDY, scenario(), SPACE, VERSIONS) is False
        row = store.study(STUDY)
        assert row is not None
        assert row.scenario == scenario()
        assert row.space == SPACE
        assert store.study_names() == [STUDY]

    def test_register_study_other_scenario_raises(self, store):
        assert store.register_study(STUDY, scenario(), SPACE, VERSIONS) is True
        with pytest.raises(ScenarioMismatch) as err:
            store.register_study(STUDY, scenario(osl=32), SPACE, VERSIONS)
        text = str(err.value)
        assert "workload" in text and "32" in text
        assert "num_gpus" not in text and "precision" not in text
        with pytest.raises(ScenarioMismatch, match="precision"):
            store.register_study(STUDY, scenario(precision="bf16"), SPACE, VERSIONS)
        # The stored scenario is untouched: the original still joins.
        assert store.register_study(STUDY, scenario(), SPACE, VERSIONS) is False
        assert store.study(STUDY).scenario == scenario()

    def test_register_study_race(self, store):
        results = race(THREADS, lambda i: store.register_study(STUDY, scenario(), SPACE,
                                                               VERSIONS))
        assert sorted(results) == [False] * (THREADS - 1) + [True]
        assert store.study_names() == [STUDY]

    # ---- slots ----------------------------------------------------------------------------
    def test_claim_slot_up_to_total(self, store, study):
        slots = [store.claim_slot(study, 3, "w") for _ in range(3)]
        assert all(isinstance(s, int) for s in slots)
        assert len(set(slots)) == 3
        assert store.claim_slot(study, 3, "w") is None
        assert store.claim_slot(study, 3, "w") is None
        assert store.slot_counts(study) == (0, 3)

    def test_slots_are_per_study(self, store, study):
        assert store.register_study(OTHER_STUDY, scenario(), SPACE, VERSIONS) is True
        a = store.claim_slot(study, 1, "w")
        assert a is not None
        assert store.claim_slot(study, 1, "w") is None
        b = store.claim_slot(OTHER_STUDY, 1, "w")
        assert b is not None and b != a
        assert store.slot_counts(study) == (0, 1)
        assert store.slot_counts(OTHER_STUDY) == (0, 1)

    def test_finish_counted_counts_and_is_never_handed_out(self, store, study):
        a = store.claim_slot(study, 2, "w")
        b = store.claim_slot(study, 2, "w")
        store.finish_slot(a, counted=True)
        assert store.slot_counts(study) == (1, 1)
        store.finish_slot(b, counted=False)
        assert store.slot_counts(study) == (1, 0)
        # Only the released slot comes back, however often one asks.
        assert store.claim_slot(study, 2, "w") == b
        assert store.claim_slot(study, 2, "w") is None
        store.finish_slot(b, counted=True)
        assert store.slot_counts(study) == (2, 0)
        for _ in range(3):
            assert store.claim_slot(study, 2, "w") is None
        assert store.slot_counts(study) == (2, 0)

    def test_finish_uncounted_releases_slot(self, store, study):
        a = store.claim_slot(study, 1, "w1")
        assert store.claim_slot(study, 1, "w2") is None
        store.finish_slot(a, counted=False)
        assert store.slot_counts(study) == (0, 0)
        assert store.claim_slot(study, 1, "w2") == a
        assert store.slot_counts(study) == (0, 1)
        assert store.claim_slot(study, 1, "w3") is None

    def test_claim_slot_race(self, store, study):
        total = 20

        def claim_all(i: int) -> list[int]:
            got = []
            while (slot := store.claim_slot(study, total, f"w{i}")) is not None:
                got.append(slot)
                assert len(got) <= total, "one worker was handed more than the total"
            return got

        claimed = [s for got in race(THREADS, claim_all) for s in got]
        assert len(claimed) == total
        assert len(set(claimed)) == total
        assert store.slot_counts(study) == (0, total)
        assert store.claim_slot(study, total, "late") is None

    def test_claim_and_finish_race_never_exceeds_total(self, store, second_store, study):
        total = 20
        stores = [store, second_store]  # half the workers in "another process"

        def work(i: int) -> int:
            s, runs = stores[i % 2], 0
            while (slot := s.claim_slot(study, total, f"w{i}")) is not None:
                runs += 1
                # A worker counts at most ``total`` trials, each after one interrupted one.
                assert runs <= 2 * total, "a counted slot was handed out again"
                # Every other trial of a worker is interrupted: its place goes back.
                s.finish_slot(slot, counted=runs % 2 == 0)
            return runs

        runs = sum(race(THREADS, work))
        assert store.slot_counts(study) == (total, 0)
        assert runs > total  # released places were run again
        assert store.claim_slot(study, total, "late") is None

    # ---- key claims -----------------------------------------------------------------------
    def test_claim_key_race(self, store, study):
        trials = [100 + i for i in range(THREADS)]
        won = race(THREADS, lambda i: store.claim_key(study, "key-a", trials[i]))
        assert won.count(True) == 1
        assert won.count(False) == THREADS - 1
        holder = trials[won.index(True)]
        losers = [t for t in trials if t != holder]
        # A non-holder's release does nothing.
        store.release_key(study, "key-a", losers[0])
        assert store.claim_key(study, "key-a", losers[1]) is False
        # The holder's release lets exactly one other trial claim it.
        store.release_key(study, "key-a", holder)
        assert store.claim_key(study, "key-a", losers[1]) is True
        assert store.claim_key(study, "key-a", losers[2]) is False
        assert store.claim_key(study, "key-a", holder) is False

    def test_claim_key_per_study_and_key(self, store, study):
        assert store.register_study(OTHER_STUDY, scenario(), SPACE, VERSIONS) is True
        assert store.claim_key(study, "key-a", 1) is True
        assert store.claim_key(study, "key-b", 2) is True
        assert store.claim_key(OTHER_STUDY, "key-a", 3) is True
        assert store.claim_key(study, "key-a", 4) is False
        assert store.claim_key(study, "key-a", 1) is False  # even by the holder: one claim

    # ---- dead workers: reaping ------------------------------------------------------------
    def test_reap_stale_bound_slot(self, store, study):
        a = store.claim_slot(study, 1, "dead")
        store.bind_slot(a, 11)
        assert store.reap_slots(study, STALE_AFTER_S) == []  # just claimed: alive
        time.sleep(WAIT_S)
        assert store.reap_slots(study, 60.0) == []  # not stale for a longer grace period
        assert store.reap_slots(study, STALE_AFTER_S) == [11]
        assert store.reap_slots(study, STALE_AFTER_S) == []  # reaped once
        assert store.slot_counts(study) == (0, 0)
        # The reaped slot is handed out again.
        assert store.claim_slot(study, 1, "alive") == a
        assert store.slot_counts(study) == (0, 1)

    def test_reap_spares_touched_slot(self, store, study):
        dead = store.claim_slot(study, 2, "dead")
        alive = store.claim_slot(study, 2, "alive")
        store.bind_slot(dead, 11)
        store.bind_slot(alive, 12)
        time.sleep(WAIT_S)
        store.touch_slot(alive)
        assert store.reap_slots(study, STALE_AFTER_S) == [11]
        assert store.slot_counts(study) == (0, 1)
        assert store.claim_slot(study, 2, "new") == dead
        assert store.claim_slot(study, 2, "new") is None

    def test_reap_unbound_and_recently_bound_slots(self, store, study):
        unbound = store.claim_slot(study, 2, "dead-before-bind")
        slow = store.claim_slot(study, 2, "slow-to-bind")
        time.sleep(WAIT_S)
        store.bind_slot(slow, 12)  # binding is a sign of life too
        # The unbound orphan is released, with no trial to fail; the late binder stays.
        assert store.reap_slots(study, STALE_AFTER_S) == []
        assert store.slot_counts(study) == (0, 1)
        assert store.claim_slot(study, 2, "alive") == unbound
        assert store.claim_slot(study, 2, "alive") is None

    def test_reap_never_takes_finished_slots(self, store, study):
        done = store.claim_slot(study, 2, "w")
        given_back = store.claim_slot(study, 2, "w")
        store.bind_slot(done, 11)
        store.bind_slot(given_back, 12)
        store.finish_slot(done, counted=True)
        store.finish_slot(given_back, counted=False)
        time.sleep(WAIT_S)
        store.touch_slot(done)  # a late heartbeat does not revive a finished slot
        store.touch_slot(given_back)
        assert store.slot_counts(study) == (1, 0)
        assert store.reap_slots(study, STALE_AFTER_S) == []
        assert store.slot_counts(study) == (1, 0)
        # The done slot stays done: only the released one is handed out.
        assert store.claim_slot(study, 2, "w") == given_back
        assert store.claim_slot(study, 2, "w") is None

    def test_reap_releases_key_claims(self, store, study):
        dead = store.claim_slot(study, 2, "dead")
        alive = store.claim_slot(study, 2, "alive")
        store.bind_slot(dead, 11)
        store.bind_slot(alive, 12)
        assert store.claim_key(study, "key-dead", 11) is True
        assert store.claim_key(study, "key-dead-2", 11) is True
        assert store.claim_key(study, "key-alive", 12) is True
        time.sleep(WAIT_S)
        store.touch_slot(alive)
        assert store.claim_key(study, "key-dead", 13) is False
        assert store.reap_slots(study, STALE_AFTER_S) == [11]
        assert store.claim_key(study, "key-dead", 13) is True
        assert store.claim_key(study, "key-dead-2", 14) is True
        assert store.claim_key(study, "key-alive", 15) is False  # the live trial keeps its own

    def test_reap_is_per_study(self, store, study):
        assert store.register_study(OTHER_STUDY, scenario(), SPACE, VERSIONS) is True
        a = store.claim_slot(study, 1, "dead")
        b = store.claim_slot(OTHER_STUDY, 1, "dead")
        store.bind_slot(a, 11)
        store.bind_slot(b, 21)
        time.sleep(WAIT_S)
        assert store.reap_slots(study, STALE_AFTER_S) == [11]
        assert store.slot_counts(OTHER_STUDY) == (0, 1)
        assert store.reap_slots(OTHER_STUDY, STALE_AFTER_S) == [21]

    def test_reap_race_each_trial_once(self, store, study):
        total = 24
        trial_ids = [1000 + i for i in range(total)]
        for trial_id in trial_ids:
            slot = store.claim_slot(study, total, "dead")
            store.bind_slot(slot, trial_id)
            assert store.claim_key(study, f"key-{trial_id}", trial_id) is True
        time.sleep(WAIT_S)
        reaped = [t for got in race(THREADS, lambda i: store.reap_slots(study, STALE_AFTER_S))
                  for t in got]
        twice = sorted(t for t, n in Counter(reaped).items() if n > 1)
        assert not twice, f"reaped by more than one caller: {twice}"
        assert sorted(reaped) == trial_ids
        assert store.slot_counts(study) == (0, 0)
        assert all(store.claim_key(study, f"key-{t}", t + 1) for t in trial_ids)
        again = {store.claim_slot(study, total, "new") for _ in range(total)}
        assert None not in again and len(again) == total
        assert store.claim_slot(study, total, "new") is None

    # ---- dead workers: Optuna's stale heartbeat -------------------------------------------
    def test_a_reaped_worker_cannot_finish_or_touch_the_next_holders_slot(self, store, study):
        slot = store.claim_slot(study, 1, "slow")
        store.bind_slot(slot, 11)
        time.sleep(WAIT_S)
        assert store.reap_slots(study, STALE_AFTER_S) == [11]
        assert store.claim_slot(study, 1, "next") == slot
        store.bind_slot(slot, 12)
        # The slow worker wakes up: its touch and its finish must not act on trial 12's slot.
        store.touch_slot(slot, 11)
        store.finish_slot(slot, counted=False, trial_id=11)
        assert store.live_trial_ids(study) == {12}
        assert store.slot_counts(study) == (0, 1)
        store.finish_slot(slot, counted=True, trial_id=12)
        assert store.slot_counts(study) == (1, 0) and store.live_trial_ids(study) == set()

    def test_release_trial(self, store, study):
        a = store.claim_slot(study, 2, "dead")
        b = store.claim_slot(study, 2, "alive")
        store.bind_slot(a, 11)
        store.bind_slot(b, 12)
        assert store.claim_key(study, "key-dead", 11) is True
        assert store.claim_key(study, "key-alive", 12) is True
        store.release_trial(study, 11)
        assert store.slot_counts(study) == (0, 1)
        assert store.claim_key(study, "key-dead", 13) is True
        assert store.claim_key(study, "key-alive", 13) is False  # another trial's claim stays
        assert store.claim_slot(study, 2, "new") == a
        assert store.claim_slot(study, 2, "new") is None

    def test_release_trial_leaves_done_slots_and_other_trials(self, store, study):
        done = store.claim_slot(study, 2, "w")
        live = store.claim_slot(study, 2, "w")
        store.bind_slot(done, 11)
        store.bind_slot(live, 12)
        assert store.claim_key(study, "key-a", 12) is True
        store.finish_slot(done, counted=True)
        store.release_trial(study, 11)  # Optuna fails a finished trial late: nothing to free
        store.release_trial(study, 99)  # a trial that holds nothing
        assert store.slot_counts(study) == (1, 1)
        assert store.claim_key(study, "key-a", 13) is False
        assert store.claim_slot(study, 2, "w") is None

    # ---- measurements ---------------------------------------------------------------------
    def test_measurement_round_trip(self, store, study):
        rec = measurement(
            trial_number=3, load_points=(point(8, 1500.0), point(64, 4200.5)), feasible=True,
            objective=4200.5, operating_concurrency=64, max_requests_in_flight=128,
            message="fine", log_tail="last line", log_path="/tmp/log.txt",
            runner_settings={"sim_noise": 0.0}, raw={"nested": {"list": [1, 2.5, "x"]}},
            versions={"autotune": "0.0-test"}, host="worker-1")
        mid = store.add_measurement(rec)
        assert isinstance(mid, int)
        [got] = store.measurements(study)
        assert got.id == mid
        assert isinstance(got.status, Status) and got.status is Status.OK
        assert isinstance(got.config, EngineConfig) and got.config == rec.config
        assert isinstance(got.workload, Workload) and got.workload == rec.workload
        assert got.load_points == rec.load_points  # in the order given
        assert got.operating_point == point(64, 4200.5)
        for name in ("study_name", "trial_number", "runner", "key", "feasible", "objective",
                     "operating_concurrency", "max_requests_in_flight", "failure_class",
                     "message", "log_tail", "log_path", "runner_settings", "raw", "versions",
                     "reused_from", "host"):
            assert getattr(got, name) == getattr(rec, name), name
        assert got.started_at is not None and got.finished_at is not None

    def test_measurements_in_order_and_filtered(self, store, study):
        assert store.register_study(OTHER_STUDY, scenario(), SPACE, VERSIONS) is True
        statuses = [Status.OK, Status.FAILED, Status.INFEASIBLE, Status.FAILED, Status.REUSED]
        ids = [store.add_measurement(measurement(status=st, trial_number=i,
                                                 failure_class="crash" if st is Status.FAILED
                                                 else None))
               for i, st in enumerate(statuses)]
        store.add_measurement(measurement(study=OTHER_STUDY))
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        rows = store.measurements(study)
        assert [r.id for r in rows] == ids
        assert [r.status for r in rows] == statuses
        assert all(isinstance(r.status, Status) for r in rows)
        failed = store.measurements(study, (Status.FAILED,))
        assert [r.id for r in failed] == [ids[1], ids[3]]
        assert all(r.failure_class == "crash" for r in failed)
        both = store.measurements(study, (Status.OK, Status.INFEASIBLE))
        assert [r.id for r in both] == [ids[0], ids[2]]
        assert len(store.measurements(OTHER_STUDY)) == 1

    def test_find_reusable_first_reusable_by_id(self, store, study):
        assert store.find_reusable(study, "key-a") is None
        store.add_measurement(measurement(status=Status.FAILED))
        store.add_measurement(measurement(status=Status.PREDICTED))
        store.add_measurement(measurement(status=Status.REUSED, reused_from=1))
        store.add_measurement(measurement(status=Status.LOST))
        store.add_measurement(measurement(status=Status.INTERRUPTED))
        assert store.find_reusable(study, "key-a") is None
        first = store.add_measurement(measurement(status=Status.INFEASIBLE, trial_number=7,
                                                  message="out of memory"))
        store.add_measurement(measurement(status=Status.OK, trial_number=8, feasible=True,
                                          objective=10.0))
        got = store.find_reusable(study, "key-a")
        assert got is not None
        assert got.id == first
        assert got.status is Status.INFEASIBLE
        assert got.trial_number == 7 and got.message == "out of memory"

    def test_find_reusable_per_study_and_key(self, store, study):
        assert store.register_study(OTHER_STUDY, scenario(), SPACE, VERSIONS) is True
        store.add_measurement(measurement(study=OTHER_STUDY, key="key-a", status=Status.OK))
        store.add_measurement(measurement(key="key-b", status=Status.OK))
        assert store.find_reusable(study, "key-a") is None
        assert store.find_reusable(study, "key-b").key == "key-b"
        assert store.find_reusable(OTHER_STUDY, "key-a").study_name == OTHER_STUDY

    def test_find_reusable_only_reusable_statuses(self, store, study):
        for status in Status:
            mid = store.add_measurement(measurement(key=f"key-{status.value}", status=status))
            got = store.find_reusable(study, f"key-{status.value}")
            if status in REUSABLE:
                assert got is not None and got.id == mid and got.status is status, status
            else:
                assert got is None, f"a {status.value!r} result must not be reused"

    # ---- engine cache and profiles --------------------------------------------------------
    def test_engine_cache_round_trip(self, store, second_store):
        assert store.engine_get("engine-1") is None
        info = {"path": "/engines/e1", "settings": {"tp": 2, "pp": 1}, "build_s": 312.5}
        store.engine_put("engine-1", "trtllm", info)
        assert store.engine_get("engine-1") == info
        assert second_store.engine_get("engine-1") == info
        newer = {"path": "/engines/e1-rebuilt", "settings": {"tp": 2, "pp": 1}}
        store.engine_put("engine-1", "trtllm", newer)
        assert store.engine_get("engine-1") == newer
        assert store.engine_get("engine-2") is None

    def test_profile_round_trip(self, store, second_store):
        assert store.profile("lab-h100") is None
        data = {"gpu": {"memory_gib": 79.6, "tflops": {"fp8": 1800.0}}, "fitted": [0.1, 0.2]}
        store.save_profile("lab-h100", data)
        assert store.profile("lab-h100") == data
        assert second_store.profile("lab-h100") == data
        store.save_profile("lab-h100", {"gpu": {"memory_gib": 80.0}})
        assert store.profile("lab-h100") == {"gpu": {"memory_gib": 80.0}}
        store.save_profile("another", {})
        assert store.profile("another") == {}
        assert store.profile_names() == ["another", "lab-h100"]


__all__ = ["StoreContract", "measurement", "point", "race", "scenario"]
