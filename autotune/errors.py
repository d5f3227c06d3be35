"""autotune's one exception hierarchy.

``AutotuneError`` is the root. ``UserError`` is the branch for bad input (the CLI maps it to one
line on stderr and exit code 2, before anything is written). ``TrialFailure`` is the branch a
runner raises when one configuration cannot be measured; the study records its ``failure_class``
and message and goes on.
"""

from __future__ import annotations


class AutotuneError(Exception):
    """Root of every error autotune raises on purpose."""


class UserError(AutotuneError):
    """Bad input from the user: a malformed SLO, an unknown model, an unreachable database..."""


#: The name autotune is published under on PyPI (``autotune`` there is another project); the
#: command and the import name stay ``autotune``.
DISTRIBUTION = "autotune-llm"


def install_hint(extra: str) -> str:
    """How to install an optional extra: from PyPI, or in a checkout of the repository."""
    return f"pip install '{DISTRIBUTION}[{extra}]' (in a checkout: pip install -e '.[{extra}]')"


class DatabaseUnavailable(AutotuneError):
    """The database kept failing past the retry budget: the worker stops (exit code 3); what it
    held is released by the other workers once its trial looks dead, or by the next resume."""


class ScenarioMismatch(UserError):
    """A study exists under this name with a different scenario."""


class TrialFailure(AutotuneError):
    """One configuration could not be measured. Subclasses name the class of failure.

    ``infeasible`` failures (out of memory, invalid layout) say the configuration can never run;
    the others (crash, timeout) may be transient.
    """

    failure_class = "failed"
    infeasible = False

    def __init__(self, message: str, *, log_tail: str = "", log_path: str | None = None):
        super().__init__(message)
        self.log_tail = log_tail
        self.log_path = log_path


class OutOfMemory(TrialFailure):
    """The configuration does not fit in GPU memory (at build or at run time)."""

    failure_class = "oom"
    infeasible = True


class PredictedOutOfMemory(OutOfMemory):
    """The performance model says the weights alone cannot fit, so the engine was not started.

    A prediction, recorded as one (status ``predicted``), never as a measured OOM.
    """

    failure_class = "predicted_oom"


class BuildOutOfMemory(OutOfMemory):
    """The engine build ran out of GPU memory."""

    failure_class = "build_oom"


class InvalidConfig(TrialFailure):
    """The engine refuses this layout or these limits (heads % tp, unsupported mapping...)."""

    failure_class = "invalid_config"
    infeasible = True


class SequenceLimit(TrialFailure):
    """The engine's built sequence limits are smaller than the workload needs."""

    failure_class = "sequence_limit"
    infeasible = True


class BuildFailed(TrialFailure):
    """The engine build failed for a reason other than memory."""

    failure_class = "build_failed"


class TimedOut(TrialFailure):
    """A run made no progress within its wall-clock limit; its process group was killed."""

    failure_class = "timeout"


class Killed(TrialFailure):
    """The run was killed from outside (SIGKILL / exit 137, typically host out of memory)."""

    failure_class = "killed"


class Crashed(TrialFailure):
    """The run exited with an error not classified above."""

    failure_class = "crashed"


class BadReport(TrialFailure):
    """The run finished but its report is missing or cannot be parsed (never read as zero)."""

    failure_class = "bad_report"


class Interrupted(TrialFailure):
    """The user stopped the search (Ctrl-C / SIGTERM) during this trial."""

    failure_class = "interrupted"
