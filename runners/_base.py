"""The runner interface: how autotune measures one configuration."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from autotune.config import EngineConfig
from autotune.measurement import Measurement
from autotune.scenario import Scenario
from autotune.specs import Workload


class Runner(ABC):
    """Measures configurations of one scenario.

    Contract
    --------
    ``measure(config, workload, loads)`` returns a ``Measurement`` with exactly one
    ``LoadPoint`` per requested load, in the order given (a load is a total concurrency over all
    replicas, or ``MAX_CONCURRENCY`` for every request at once). When the configuration cannot be
    measured it raises a subclass of ``autotune.errors.TrialFailure`` that names the class of
    failure (out of memory, invalid config, build failed, timed out, killed, crashed, bad
    report); it never returns made-up or zero numbers in place of a failure.

    ``honours`` names the ``EngineConfig`` fields the runner applies; the others are ignored and
    the study does not search them.

    Resources
    ---------
    A runner may hold processes, files or engines; ``close()`` releases them and is safe to
    call twice. ``interrupt()`` is called from a signal handler to stop the run in progress (its
    whole process group) as soon as possible; the run then raises ``Interrupted``.
    """

    name: ClassVar[str]
    #: True when every run costs real time (a real engine): the study then finds each trial's
    #: operating point by bisecting the load ladder rather than walking up all of it.
    expensive: ClassVar[bool] = True
    honours: ClassVar[frozenset[str]] = frozenset(
        {"tp", "pp", "dp", "max_batch_size", "max_num_tokens", "kv_fraction", "chunked_prefill"}
    )

    def __init__(self, scenario: Scenario):
        self.scenario = scenario

    @abstractmethod
    def measure(self, config: EngineConfig, workload: Workload, loads: Sequence[int]) -> Measurement:
        """Measure ``config`` at each load (see the class contract)."""

    @classmethod
    def check_options(cls, scenario: Scenario, **options) -> None:  # noqa: B027 - optional hook
        """Validate runner options without side effects (raises UserError).

        Meant to be called before the database is opened, so that a bad option writes nothing;
        the constructor checks the same options again.
        """

    def settings(self) -> dict:
        """Runner settings that change results (part of the key that deduplicates measurements)."""
        return {"runner": self.name}

    def interrupt(self) -> None:  # noqa: B027 - optional hook
        """Stop the run in progress, if any."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes and files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EngineBuilder:
    """Mixin for runners that build engines before measuring (checked with ``isinstance``).

    Built engines are cached on disk; with ``use_store`` they are also recorded in autotune's
    database (``Store.engine_get`` / ``engine_put``) so that workers on other nodes sharing the
    file system find them.
    """

    #: autotune's Store when the study shares its database with the runner (else disk only).
    engine_store = None

    def engine_key(self, config: EngineConfig) -> str:
        """Hash of the settings that change the built engine (equal keys: one build)."""
        raise NotImplementedError

    def use_store(self, store) -> None:
        """Record built engines in ``store`` (an ``autotune.db.Store``) too."""
        self.engine_store = store
