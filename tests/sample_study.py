"""A small study with every kind of trial, made in a second or two with the sim runner: for the
report, export and deploy tests.

``FlakySim`` is the sim runner with failures injected by config, and the first trials are
enqueued, so the study holds measured trials, reused ones, infeasible ones (out of memory) and
failed ones (a crash) whatever the sampler proposes after them.
"""

import os
import shutil
import tempfile
from pathlib import Path

from autotune.config import EngineConfig
from autotune.errors import Crashed, OutOfMemory
from autotune.runners.sim import SimRunner
from autotune.scenario import Scenario
from autotune.space import SearchSpace
from autotune.study import Tuner, open_storage

STUDY = "demo"
SLO = "tpot:p99<=30ms"
#: 4 layouts x 4 batch limits x 2 token limits = 32 configs; tp1 does not fit Llama-70B in fp8 on
#: one H100 with room for a KV cache, tp2-pp2 pairs are crashed below.
SPACE = {"tp": [1, 2, 4, 8], "pp": [1, 2], "max_batch_size": [32, 128, 512, 2048],
         "max_num_tokens": [2048, 8192], "kv_fraction": [0.9], "chunked_prefill": [True],
         "concurrency": [1, 4, 16, 64, 256, "max"]}


class FlakySim(SimRunner):
    """The sim runner, but batch 2048 on TP<=2 is out of memory and TP2 x PP2 crashes."""

    name = "flakysim"

    def measure(self, config, workload, loads):
        if config.max_batch_size == 2048 and config.tp <= 2:
            raise OutOfMemory("KV cache for 2048 sequences does not fit (injected)")
        if config.tp == 2 and config.pp == 2:
            raise Crashed("engine crashed: CUDA error: an illegal memory access was "
                          "encountered (injected)")
        return super().measure(config, workload, loads)


def scenario(slo: str | None = SLO) -> Scenario:
    return Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=8, precision="fp8",
                          isl=1024, osl=256, slo=slo, runner=FlakySim.name)


def build_study(url: str, trials: int = 16, *, slo: str | None = SLO, name: str = STUDY,
                seed: int = 3) -> str:
    """Run ``trials`` trials into the database at ``url``; the study's name."""
    scen = scenario(slo)
    db = open_storage(url)
    tuner = Tuner(scen, SearchSpace.from_dict(SPACE), FlakySim(scen), db, name, seed=seed)
    study = tuner.open()
    # The first trials are fixed, so every kind of outcome is there whatever the sampler does
    # next: measured, out of memory, crashed, and a repeat (reused).
    for tp, pp, batch, tokens in ((8, 1, 128, 8192), (2, 1, 2048, 8192), (2, 2, 128, 2048),
                                  (8, 1, 128, 8192), (1, 1, 32, 2048)):
        study.enqueue_trial(SearchSpace.params_of(EngineConfig(
            tp=tp, pp=pp, dp=8 // (tp * pp), max_batch_size=batch, max_num_tokens=tokens,
            kv_fraction=0.9, chunked_prefill=True, precision=scen.precision)))
    tuner.optimize(trials)
    return name


#: The sample studies tests copy: name -> (trials, SLO).
SAMPLES = {STUDY: (16, SLO), "hopeless": (6, "tpot:p99<=1ms")}


def sample_copy(tmp_path_factory, folder: Path, name: str = STUDY) -> str:
    """A copy, in ``folder``, of sample study ``name`` (built once per test session, in
    SQLite); the copy's URL."""
    template = tmp_path_factory.getbasetemp() / f"sample-{name}.db"
    if not template.exists():
        trials, slo = SAMPLES[name]
        # Built in memory-backed /dev/shm where there is one: every trial commits a dozen
        # times, and each fsync on a busy disk costs more than the trial itself.
        shm = Path("/dev/shm")
        build_dir = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK)
                                          else tmp_path_factory.getbasetemp()))
        try:
            build_study(f"sqlite:///{build_dir / 'study.db'}", trials, slo=slo, name=name)
            shutil.move(build_dir / "study.db", template)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    target = folder / f"{name}.db"
    shutil.copy(template, target)
    return f"sqlite:///{target}"
