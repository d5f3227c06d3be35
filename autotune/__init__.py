"""autotune: find the LLM serving configuration with the most throughput that meets a latency SLO.

The public names are importable from here (``from autotune import Tuner``); each is loaded on
first use, so ``import autotune`` (and ``autotune --help``) stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: Public name -> the module that owns it.
_EXPORTS = {
    "AutotuneError": "autotune.errors",
    "EngineConfig": "autotune.config",
    "LoadPoint": "autotune.measurement",
    "MAX_CONCURRENCY": "autotune.measurement",
    "Measurement": "autotune.measurement",
    "Outcome": "autotune.sweep",
    "Recommendation": "autotune.recommend",
    "Results": "autotune.recommend",
    "Runner": "autotune.runners",
    "SLO": "autotune.slo",
    "Scenario": "autotune.scenario",
    "SearchSpace": "autotune.space",
    "Simulator": "autotune.model",
    "Status": "autotune.measurement",
    "TrialFailure": "autotune.errors",
    "Tuner": "autotune.study",
    "UserError": "autotune.errors",
    "Workload": "autotune.specs",
    "evaluate": "autotune.sweep",
    "get_runner": "autotune.runners",
    "open_storage": "autotune.study",
    "parse_slo": "autotune.slo",
}

__all__ = [
    "MAX_CONCURRENCY", "SLO", "AutotuneError", "EngineConfig", "LoadPoint", "Measurement",
    "Outcome", "Recommendation", "Results", "Runner", "Scenario", "SearchSpace", "Simulator",
    "Status", "TrialFailure", "Tuner", "UserError", "Workload", "__version__", "evaluate",
    "get_runner", "open_storage", "parse_slo",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from autotune.config import EngineConfig
    from autotune.errors import AutotuneError, TrialFailure, UserError
    from autotune.measurement import MAX_CONCURRENCY, LoadPoint, Measurement, Status
    from autotune.model import Simulator
    from autotune.recommend import Recommendation, Results
    from autotune.runners import Runner, get_runner
    from autotune.scenario import Scenario
    from autotune.slo import SLO, parse_slo
    from autotune.space import SearchSpace
    from autotune.specs import Workload
    from autotune.study import Tuner, open_storage
    from autotune.sweep import Outcome, evaluate


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autotune' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
