"""The runner interface: how autotune measures one configuration."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

from autotune.config import EngineConfig
from autotune.errors import UserError
from autotune.measurement import Measurement
from autotune.scenario import Scenario
from autotune.specs import Workload


@dataclass(frozen=True)
class NoOptions:
    """The settings of a runner that takes no options."""


class Runner(ABC):
    """Measures configurations of one scenario.

    Contract
    --------
    ``measure(config, workload, loads)`` returns a ``Measurement`` with exactly one
    ``LoadPoint`` per requested load, in the order given (a load is a total concurrency over all
    replicas, or ``MAX_CONCURRENCY`` for every request at once). Each replica gets
    ``replica_load(load, dp)`` requests, and the point is labelled with what was really in
    flight, ``in_flight(load, dp)`` (a multiple of dp). When the configuration cannot be
    measured it raises a subclass of ``autotune.errors.TrialFailure`` that names the class of
    failure (out of memory, invalid config, build failed, timed out, killed, crashed, bad
    report); it never returns made-up or zero numbers in place of a failure.

    Options
    -------
    A runner declares the options it takes (``search --backend ...``, or keyword arguments) as a
    dataclass, ``settings_class``; ``check_options`` refuses any other option as a user error,
    before the database is opened. ``settings()`` returns what changes results, JSON-able and
    stable for equal options: it is part of the key that deduplicates measurements.

    ``predicts`` is True for a runner whose numbers come from autotune's performance model (the
    ``sim``): the study then needs no memory gate in front of it.

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
    #: The shipped search space used when the user names none: the settings this runner's
    #: engine has, with values in its engine's terms.
    default_space: ClassVar[str] = "default"
    #: The options the runner takes, as a dataclass (its fields are the option names).
    settings_class: ClassVar[type] = NoOptions
    #: True when the runner's numbers are autotune's own model's predictions.
    predicts: ClassVar[bool] = False
    #: True when ``itl`` is measured from real token gaps; False when the runner can only report
    #: each request's TPOT in its place (an ITL bound is then judged on per-request means).
    token_gaps: ClassVar[bool] = True

    def __init__(self, scenario: Scenario):
        self.scenario = scenario

    @abstractmethod
    def measure(self, config: EngineConfig, workload: Workload, loads: Sequence[int]
                ) -> Measurement:
        """Measure ``config`` at each load (see the class contract)."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options this runner takes (the fields of ``settings_class``)."""
        return tuple(f.name for f in fields(cls.settings_class))

    @classmethod
    def check_options(cls, scenario: Scenario, **options) -> None:
        """Validate runner options without side effects (raises UserError).

        Meant to be called before the database is opened, so that a bad option writes nothing;
        the constructor checks the same options again. The base refuses the options the runner
        does not declare; a runner with options extends it to check their values.
        """
        cls.check_option_names(options)

    @classmethod
    def check_option_names(cls, options: dict) -> None:
        """Refuse options that are not fields of ``settings_class`` (UserError, one line)."""
        known = cls.option_names()
        unknown = sorted(set(options) - set(known))
        if unknown:
            flags = ", ".join("--" + name.replace("_", "-") for name in unknown)
            takes = (f"it takes {', '.join('--' + n.replace('_', '-') for n in known)}"
                     if known else "it takes no runner options")
            raise UserError(f"runner {cls.name!r} does not take {flags} ({takes})")

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
