import optuna
import pytest

from autotune.errors import UserError
from autotune.model import PerfModel
from autotune.scenario import Scenario
from autotune.space import Layout, SearchSpace


@pytest.fixture
def scenario_405b():
    return Scenario.build(model="llama-3.1-405b", gpu="h200", num_gpus=8, precision="fp8",
                          isl=2048, osl=128, slo=None)


def test_layouts_use_every_gpu_divide_heads_and_fit(scenario_405b):
    space = SearchSpace.load("default")
    layouts = space.layouts(scenario_405b)
    assert layouts
    for lay in layouts:
        assert lay.tp * lay.pp * lay.dp == 8
        assert scenario_405b.model.heads % lay.tp == 0
    # 405B in FP8 is ~405 GB: one or two H200s (141 GB each) cannot hold it, four can.
    assert all(lay.tp * lay.pp >= 4 for lay in layouts)
    assert Layout(4, 1, 2) in layouts and Layout(8, 1, 1) in layouts


def test_layouts_that_cannot_hold_the_weights_are_left_out(scenario_70b):
    layouts = SearchSpace.load("default").layouts(scenario_70b)
    assert Layout(1, 1, 8) not in layouts  # 141 GB of BF16 weights on one 80 GB GPU
    assert Layout(2, 1, 4) in layouts
    for lay in layouts:
        from autotune.config import EngineConfig
        cfg = EngineConfig(tp=lay.tp, pp=lay.pp, dp=lay.dp, precision="bf16")
        assert PerfModel(scenario_70b.model, scenario_70b.gpu, cfg).memory().fits


def test_suggest_only_proposes_configs_from_the_space(scenario_70b):
    space = SearchSpace.load("default")
    layouts = space.layouts(scenario_70b)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(50):
        trial = study.ask()
        cfg = space.suggest(trial, layouts, "bf16")
        assert Layout(cfg.tp, cfg.pp, cfg.dp) in layouts
        assert cfg.max_batch_size in space.max_batch_size
        assert cfg.kv_fraction in space.kv_fraction
        assert space.params_of(cfg) == trial.params
        study.tell(trial, 1.0)


def test_enumeration_matches_size(scenario_405b):
    space = SearchSpace.load("default")
    layouts = space.layouts(scenario_405b)
    assert len(list(space.configs(layouts, "fp8"))) == space.size(layouts)


def base() -> dict:
    return {"tp": [1, 2], "pp": [1], "max_batch_size": [64], "max_num_tokens": [4096],
            "kv_fraction": [0.9], "chunked_prefill": [True], "concurrency": [1, "max"]}


@pytest.mark.parametrize("change, message", [
    ({"tpp": [1]}, "unknown key"),
    ({"tp": []}, "non-empty list"),
    ({"tp": [0]}, "tp value 0"),
    ({"tp": ["two"]}, "tp value 'two'"),
    ({"kv_fraction": [1.5]}, "kv_fraction value 1.5"),
    ({"max_num_tokens": [8]}, "max_num_tokens value 8"),
    ({"chunked_prefill": ["yes"]}, "chunked_prefill value 'yes'"),
    ({"max_batch_size": [64, 64]}, "twice"),
    ({"tp": True}, "non-empty list"),
], ids=["unknown-key", "empty", "zero", "string", "kv-above-one", "tiny-tokens", "bool-string",
        "duplicate", "not-a-list"])
def test_bad_space_values_are_user_errors(change, message):
    data = base() | change
    with pytest.raises(UserError, match=message):
        SearchSpace.from_dict(data, source="t.yaml")


def test_missing_key_and_non_mapping_are_user_errors():
    data = base()
    del data["pp"]
    with pytest.raises(UserError, match="missing"):
        SearchSpace.from_dict(data)
    with pytest.raises(UserError, match="mapping"):
        SearchSpace.from_dict([1, 2])


def test_space_where_no_layout_divides_heads_is_refused(scenario_70b):
    space = SearchSpace.from_dict(base() | {"tp": [3], "pp": [1]})
    with pytest.raises(UserError, match="no valid parallel layout"):
        space.layouts(scenario_70b)


def test_space_from_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("tp: [8]\npp: [1]\nmax_batch_size: [256]\nmax_num_tokens: [8192]\n"
                    "kv_fraction: [0.9]\nchunked_prefill: [true]\nconcurrency: [1, 64, max]\n")
    space = SearchSpace.load(str(path))
    assert space.tp == (8,) and space.concurrency == (1, 64, -1)
    path.write_text("tp: [8\n")
    with pytest.raises(UserError, match="not valid YAML"):
        SearchSpace.load(str(path))
