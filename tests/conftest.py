import pytest

from autotune.scenario import Scenario


@pytest.fixture
def scenario_70b() -> Scenario:
    """Llama-3.1-70B in BF16 on 8xH100: needs at least two GPUs for its weights."""
    return Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=8, precision="bf16",
                          isl=1024, osl=128, slo=None)
