"""A sim runner that takes real wall-clock time per run, so tests can kill or interrupt a worker
in the middle of a trial. ``AUTOTUNE_TEST_RUN_S`` sets the seconds per measure() call.

``AUTOTUNE_TEST_DIE_AT`` makes the worker kill itself, once, on its second run (measure) or
trial (first-beat), at a chosen point of the trial's life: ``measure`` (SIGKILL inside the
measurement, after the trial's first
heartbeat) or ``first-beat`` (exit 137 as the heartbeat starts, before the first beat: the case
Optuna's stale-trial check never sees).
"""

import os
import signal
import time

from autotune import study
from autotune.runners.sim import SimRunner

DIE_AT = os.environ.get("AUTOTUNE_TEST_DIE_AT")
_calls = {"measure": 0, "first-beat": 0}


def _second_time(point: str) -> bool:
    _calls[point] += 1
    return DIE_AT == point and _calls[point] == 2


if DIE_AT == "first-beat":
    _enter = study.Heartbeat.__enter__

    def _dying_enter(self):
        if _second_time("first-beat"):
            os._exit(137)
        return _enter(self)

    study.Heartbeat.__enter__ = _dying_enter


class SlowSim(SimRunner):
    name = "slowsim"

    def measure(self, config, workload, loads):
        if _second_time("measure"):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(os.environ.get("AUTOTUNE_TEST_RUN_S", "0.5")))
        return super().measure(config, workload, loads)
