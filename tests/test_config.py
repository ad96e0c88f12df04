"""The configs' rules: each problem in one line naming its field, the rules each config's own, shared fields
declared once, the sizes of a sweep checked before it runs."""

import pytest

from finetune_lab.config import (
    BenchConfig,
    ClassifyConfig,
    ClassifySweepConfig,
    GenerateConfig,
    LoraSweepConfig,
    ProbeConfig,
)
from finetune_lab.schema import as_params, field_docs, from_strings


@pytest.mark.parametrize("raw, expected", [
    ({"ranks": "4,x"}, "ranks: must be a comma list of integers like 4,8,16, got '4,x'"),
    ({"ranks": "0,1"}, "ranks: must be integers >= 1, got 0,1"),
    ({"ranks": ""}, "ranks: must list at least one integer, like 4,8,16"),
    ({"ranks": "4,4"}, "ranks: lists 4 more than once"),
    ({"seeds": "-1"}, "seeds: must be in 0..4294967295, got -1"),
    ({"seeds": "1,4294967296"}, "seeds: must be in 0..4294967295, got 1,4294967296"),
])
def test_bad_integer_lists(raw, expected):
    assert from_strings(LoraSweepConfig, raw).problems() == [expected]


def test_rules_follow_each_config_not_a_shared_name():
    """`max_new_tokens` is >= 1 for the probe but 0 (= the logged setting) is fine for `generate`."""
    assert from_strings(ProbeConfig, {"max_new_tokens": "0"}).problems() == [
        "max_new_tokens: must be >= 1, got 0"]
    assert from_strings(GenerateConfig, {"model_uri": "models:/x/1", "max_new_tokens": "0"}).problems() == []
    assert from_strings(GenerateConfig, {"model_uri": "models:/x/1", "max_new_tokens": "-1"}).problems() == [
        "max_new_tokens: must be >= 0 (0 = the logged setting), got -1"]


def test_alpha_modes():
    ratio = LoraSweepConfig()
    assert [ratio.alpha_for(r) for r in (4, 32)] == [8.0, 64.0]  # same scale alpha/r = 2 at every rank
    fixed = LoraSweepConfig(lora_alpha=16)
    assert [fixed.alpha_for(r) / r for r in (4, 32)] == [4.0, 0.5]
    config = from_strings(LoraSweepConfig, {"lora_alpha": "0", "alpha_per_rank": "0", "eval_fraction": "0.6",
                                        "prompt_format": "xml", "target_modules": "q_proj,,v_proj"})
    assert sorted(p.split(":")[0] for p in config.problems()) == ["alpha_per_rank", "eval_fraction",
                                                                  "prompt_format", "target_modules"]


def test_speed_switches_and_token_budget():
    config = from_strings(LoraSweepConfig, {"packing": "yes", "batch_tokens": "100", "max_length": "256"})
    assert config.problems() == ["packing: must be one of auto, on, off, got 'yes'",
                                 "batch_tokens: must be 0 (= batch_size examples) or at least max_length (256) so "
                                 "every example fits, got 100"]
    assert from_strings(ProbeConfig, {"batch_tokens": "-1"}).problems()[0].startswith("batch_tokens: must be 0")
    assert from_strings(LoraSweepConfig, {"packing": "on", "batch_tokens": "16384"}).problems() == []
    assert from_strings(ClassifyConfig, {"compile": "off"}).problems() == []


def test_shared_fields_are_declared_once_and_keep_each_entry_points_default():
    shared = {"experiment", "run_name", "register_as", "resume", "seeds", "executor", "workers", "cpus_per_worker",
              "max_children"}
    for name in shared:
        declared = [k for k in ClassifySweepConfig.__mro__ if name in vars(k).get("__annotations__", {})]
        assert len([k for k in declared if k.__name__ in ("Tracked", "Registering", "Resumable", "Sweeping")]) == 1
    assert [c().experiment for c in (ClassifyConfig, ClassifySweepConfig, LoraSweepConfig, ProbeConfig)] == [
        "classification", "classify_sweep", "lora_sweep", "retrain_probe"]
    assert field_docs(ClassifyConfig)["experiment"] == field_docs(BenchConfig)["experiment"]
    seeded = [k.__name__ for k in BenchConfig.__mro__ + ClassifyConfig.__mro__ + ProbeConfig.__mro__
              if "seed" in vars(k).get("__annotations__", {})]
    assert set(seeded) == {"Seeded"}


def test_float_lists_are_parsed_and_logged_as_given():
    config = from_strings(ClassifySweepConfig, {"learning_rates": "2e-5, 4e-5", "epochs": "1,2.5"})
    assert config.learning_rates == (2e-5, 4e-5) and config.epochs == (1.0, 2.5) and config.problems() == []
    assert as_params(config)["learning_rates"] == "2e-05,4e-05"
    child = config.child(4e-5, 2.5, 3, "lr4e-05-ep2.5-seed3")
    assert (child.learning_rate, child.epochs, child.seed, child.register_as) == (4e-5, 2.5, 3, "")
    assert child.model == config.model and child.problems() == []


def test_a_grid_beyond_max_children_is_refused_unless_max_children_allows_it():
    rates, seeds = ",".join(f"{k}e-5" for k in range(1, 101)), ",".join(map(str, range(100)))
    config = from_strings(ClassifySweepConfig, {"learning_rates": rates, "seeds": seeds})
    assert config.problems() == ["max_children: the grid has 10,000 children (100 learning_rates x 1 epochs x 100 "
                                 "seeds), more than max_children=100: give fewer values, or raise max_children"]
    assert from_strings(ClassifySweepConfig, {"learning_rates": rates, "seeds": seeds,
                                              "max_children": "10000"}).problems() == []
    lora = from_strings(LoraSweepConfig, {"methods": "lora,dora", "ranks": "4,8,16", "seeds": "1,2",
                                          "max_children": "11"})
    assert lora.problems() == ["max_children: the grid has 12 children (2 methods x 3 ranks x 2 seeds), more than "
                               "max_children=11: give fewer values, or raise max_children"]
    assert from_strings(LoraSweepConfig, {"max_children": "0"}).problems() == ["max_children: must be >= 1, got 0"]
