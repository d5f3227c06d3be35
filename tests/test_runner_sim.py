import pytest

from autotune.config import EngineConfig
from autotune.runners.sim import SimRunner
from autotune.runners.testing import RunnerContract


class TestSimRunnerContract(RunnerContract):
    @pytest.fixture
    def runner(self, scenario_70b):
        return SimRunner(scenario_70b)

    @pytest.fixture
    def oom_config(self):
        return EngineConfig(tp=1, pp=1, precision="bf16")  # 141 GB of weights on one 80 GB GPU
