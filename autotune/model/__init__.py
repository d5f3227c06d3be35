"""The built-in performance model, pure: no runner, no Optuna, no database.

- ``calibration``: the fitted constants per GPU and precision;
- ``perf``: one replica's memory plan and the time of one scheduler iteration;
- ``scheduler``: event-driven in-flight batching (per-request timestamps);
- ``feasibility``: THE layout rules and the memory gates;
- ``simulate``: ``Simulator``, load points of a configuration from all of the above.
"""

from autotune.model.calibration import (
    BACKEND_CONSTANTS,
    BACKENDS,
    BOUNDS,
    DEFAULT_BACKEND,
    DEFAULT_ENGINE,
    ENGINE_CONSTANTS,
    ENGINES,
    Calibration,
    calibration_file,
    load_calibration,
    with_constants,
)
from autotune.model.feasibility import Capacity, check_layout, gate, replica_capacity
from autotune.model.perf import KV_BLOCK_TOKENS, RUNTIME_RESERVE_BYTES, MemoryPlan, PerfModel
from autotune.model.scheduler import ContextWait
from autotune.model.simulate import SIM_REQUESTS, Benchmark, Simulator

__all__ = [
    "BACKEND_CONSTANTS", "BACKENDS", "BOUNDS", "DEFAULT_BACKEND", "DEFAULT_ENGINE",
    "ENGINE_CONSTANTS", "ENGINES", "KV_BLOCK_TOKENS",
    "RUNTIME_RESERVE_BYTES", "SIM_REQUESTS", "Benchmark", "Calibration", "Capacity", "ContextWait",
    "MemoryPlan",
    "PerfModel", "Simulator", "calibration_file", "check_layout", "gate", "load_calibration",
    "replica_capacity", "with_constants",
]
