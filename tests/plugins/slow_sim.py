"""A sim runner that takes real wall-clock time per run, so tests can kill or interrupt a worker
in the middle of a trial. ``AUTOTUNE_TEST_RUN_S`` sets the seconds per measure() call."""

import os
import time

from autotune.runners.sim import SimRunner


class SlowSim(SimRunner):
    name = "slowsim"

    def measure(self, config, workload, loads):
        time.sleep(float(os.environ.get("AUTOTUNE_TEST_RUN_S", "0.5")))
        return super().measure(config, workload, loads)
