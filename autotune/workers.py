"""Running a search: one worker in this process, or several worker processes on one study.

Every worker opens its own database connection, runner and Optuna study object and claims trial
slots from the shared database, so workers started here with ``--workers N`` and workers started
by other ``autotune search`` commands (on other machines, same ``--storage`` and ``--study``)
cooperate the same way.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from autotune.errors import DatabaseUnavailable, UserError

#: Exit code of a search stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
#: Exit code of a worker whose database kept failing past the retry budget.
EXIT_DATABASE = 3


@dataclass(frozen=True)
class SearchJob:
    """Everything a worker needs to join a search (plain values: it crosses process lines)."""

    model: str
    gpu: str
    num_gpus: int | None
    isl: int
    osl: int
    nodes: int | None = None
    gpus_per_node: int | None = None
    fabric: str | None = None
    precision: str | None = None
    slo: str | None = None
    runner: str = "sim"
    runner_options: dict = field(default_factory=dict)
    space: str | None = None
    storage: str = "sqlite:///autotune.db"
    study: str | None = None
    seed: int | None = None
    trials: int = 60
    timeout: float | None = None
    heartbeat_s: int = 30
    grace_s: int = 120
    retry_s: float = 120.0  # a failing database is retried this long (autotune.db.Retry)
    profile: str | None = None  # a profile stored in ``storage``
    prior: str | None = None  # "sim": the built-in model picks the first trials

    def scenario(self):
        from autotune.scenario import Scenario

        profile = None
        if self.profile:
            from autotune.profile import load_profile
            from autotune.study import open_storage

            profile = load_profile(open_storage(self.storage, create=False).store, self.profile)
        return Scenario.build(model=self.model, gpu=self.gpu, num_gpus=self.num_gpus,
                              nodes=self.nodes, gpus_per_node=self.gpus_per_node,
                              fabric=self.fabric,
                              precision=self.precision, isl=self.isl, osl=self.osl, slo=self.slo,
                              runner=self.runner, profile=profile)

    def check(self):
        """Validate everything the user typed without touching the database (UserError)."""
        from autotune.runners import get_runner
        from autotune.space import SearchSpace

        if self.heartbeat_s < 1 or self.grace_s <= self.heartbeat_s:
            raise UserError("--heartbeat must be >= 1 s and --grace longer than --heartbeat")
        if not self.retry_s >= 0 or self.retry_s == float("inf"):
            raise UserError(f"--db-retry must be a finite number of seconds >= 0, got "
                            f"{self.retry_s:g}")
        if self.prior not in (None, "sim"):
            raise UserError(f"unknown --prior {self.prior!r}: use 'sim' (the built-in model)")
        scen = self.scenario()
        runner_cls = get_runner(self.runner)
        runner_cls.check_options(scen, **self.runner_options)
        # A runner declares its space (the settings its engine has, in its engine's terms).
        space = SearchSpace.load(self.space or runner_cls.default_space)
        # UserError when no layout of the space can work
        space.layouts(scen, weights_only=not runner_cls.predicts)
        return scen, runner_cls, space

    def prior_size(self) -> int:
        """How many configurations ``--prior sim`` scores (0 without a prior)."""
        if self.prior != "sim":
            return 0
        scen, runner_cls, space = self.check()
        return space.size(space.layouts(scen, weights_only=not runner_cls.predicts))

    def tuner(self, worker_index: int = 0, progress: Callable[[int], None] | None = None):
        """A Tuner joined to the study (the runner is the caller's to close); ``progress``
        follows the model's prior (see ``Tuner.open``)."""
        from autotune.runners import EngineBuilder
        from autotune.study import Tuner, open_storage

        scen, runner_cls, space = self.check()
        db = open_storage(self.storage, create=True, heartbeat_s=self.heartbeat_s,
                          grace_s=self.grace_s, retry_s=self.retry_s)
        # Distinct seeds per worker: the same seed would make every worker propose the same
        # start-up points.
        seed = None if self.seed is None else self.seed + worker_index
        runner = runner_cls(scen, **self.runner_options)
        if isinstance(runner, EngineBuilder):
            runner.use_store(db.store)  # engines built by any worker of the study are found
        tuner = Tuner(scen, space, runner, db, self.study, seed=seed, prior=self.prior)
        tuner.open(progress)
        return tuner


@contextmanager
def _signals_interrupt(tuner) -> Iterator[None]:
    """While inside: SIGINT and SIGTERM stop the tuner (its runner's process group at once, the
    search where that leaves the study consistent; see ``StopRequest``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        tuner.stop.request(tuner.runner)

    old = signal.signal(signal.SIGINT, handler), signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


def run_here(job: SearchJob, tuner=None, on_trial: Callable | None = None) -> None:
    """One worker in this process (raises KeyboardInterrupt when stopped by a signal)."""
    tuner = tuner or job.tuner()
    with tuner.runner, _signals_interrupt(tuner):
        tuner.optimize(job.trials, timeout=job.timeout, on_trial=on_trial)


#: Seconds between a worker's checks that the ``--workers`` parent is still there.
PARENT_CHECK_S = 1.0


def _stop_when_orphaned(parent: int) -> None:
    """Ask this process to stop (SIGTERM, handled like Ctrl-C: the trial is recorded as
    interrupted, nothing stays claimed) once its parent is gone: a ``--workers`` parent killed
    with SIGKILL can pass nothing on, and its workers must not go on without output."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="autotune-parent-watch", daemon=True).start()


def _worker_main(job: SearchJob, index: int, parent: int
                 ) -> None:  # pragma: no cover - runs in a child
    _stop_when_orphaned(parent)
    try:
        tuner = job.tuner(index)
        run_here(job, tuner)
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (UserError, DatabaseUnavailable) as exc:
        from autotune import console

        console.error(f"worker {index}: {exc}")
        raise SystemExit(EXIT_DATABASE if isinstance(exc, DatabaseUnavailable) else 2) from None


def run_workers(job: SearchJob, workers: int, poll: Callable[[], None] | None = None,
                poll_every_s: float = 0.5) -> list[int]:
    """Start ``workers`` processes on the study and wait for them; their exit codes.

    Ctrl-C reaches the children from the terminal; SIGTERM to this process is passed on to
    them; a SIGKILL of this process leaves them orphans, which stop by themselves within
    ``PARENT_CHECK_S``. Each way they record their trial as interrupted and exit; then
    KeyboardInterrupt is raised here.
    """
    ctx = multiprocessing.get_context("spawn")  # no forked database connections or threads
    procs = [ctx.Process(target=_worker_main, args=(job, i, os.getpid()),
                         name=f"autotune-worker-{i}") for i in range(workers)]
    interrupted = False

    def forward(signum, frame):
        nonlocal interrupted
        interrupted = True
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    old_int = signal.signal(signal.SIGINT, forward)
    old_term = signal.signal(signal.SIGTERM, forward)
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            if poll is not None:
                poll()
            time.sleep(poll_every_s)
            for p in procs:
                p.join(timeout=0)
        if poll is not None:
            poll()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        for p in procs:
            p.join()
    codes = [p.exitcode for p in procs]
    if interrupted or EXIT_INTERRUPTED in codes:
        raise KeyboardInterrupt
    return codes


__all__ = ["EXIT_DATABASE", "EXIT_INTERRUPTED", "SearchJob", "run_here", "run_workers"]
