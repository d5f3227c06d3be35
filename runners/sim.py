"""The ``sim`` runner: the built-in performance model (``autotune.model``), no GPU needed."""

from __future__ import annotations

from collections.abc import Sequence

from autotune.config import EngineConfig
from autotune.measurement import LoadPoint, Measurement
from autotune.model import Calibration, Simulator
from autotune.runners._base import Runner
from autotune.scenario import Scenario
from autotune.specs import Workload


class SimRunner(Runner):
    """Measures a configuration by simulating it (milliseconds per configuration).

    Its numbers are the model's predictions: they are stored under runner ``sim``, never as an
    engine's measurements. It takes no options: the model's constants come from the scenario
    (the shipped calibration or ``--profile``).
    """

    name = "sim"
    expensive = False  # milliseconds per load point: walk the whole ladder
    predicts = True

    def __init__(self, scenario: Scenario, calibration: Calibration | None = None,
                 num_requests: int | None = None):
        super().__init__(scenario)
        self.calibration = calibration or scenario.calibration
        #: Requests per replica and load point; None: ``autotune.model.SIM_REQUESTS``. Set it to
        #: reproduce a benchmark that ran a fixed data set (trtllm-bench --dataset).
        self.num_requests = num_requests
        self.model = Simulator(scenario.model, scenario.gpu, self.calibration, num_requests)

    def settings(self) -> dict:
        cal = self.calibration.to_dict() if self.calibration else None
        return {"runner": self.name, "calibration": cal}

    def measure(self, config: EngineConfig, workload: Workload, loads: Sequence[int]
                ) -> Measurement:
        return self.model.measure(config, workload, loads)

    def measure_rates(self, config: EngineConfig, workload: Workload, rates: Sequence[float],
                      num_requests: int | None = None) -> list[LoadPoint]:
        """Open-loop load points at Poisson request rates (see ``Simulator.measure_rates``)."""
        return self.model.measure_rates(config, workload, rates, num_requests)


__all__ = ["SimRunner"]
