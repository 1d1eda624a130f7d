"""LoRAConfig: defaults, PEFT's name matching, and the errors for settings that cannot work."""

import json

import pytest

import minilora
from conftest import tiny_llama
from minilora import LLAMA_TARGETS, LoRAConfig
from minilora.config import matches, pattern_key


def test_defaults_are_the_documented_ones():
    config = LoRAConfig()
    assert (config.r, config.alpha, config.dropout, config.bias) == (16, None, 0.0, "none")
    assert config.lora_alpha == 32  # alpha=None means 2 * r
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert list(LLAMA_TARGETS) == config.target_modules
    assert config.init == "kaiming" and not config.use_rslora
    assert config.rank_pattern == {} and config.alpha_pattern == {}


def test_defaults_are_not_shared_between_instances():
    a, b = LoRAConfig(), LoRAConfig()
    a.target_modules.append("lm_head")
    a.rank_pattern["q_proj"] = 4
    assert "lm_head" not in b.target_modules and b.rank_pattern == {}


def test_alpha_defaults_to_twice_the_rank_given():
    # the scaling alpha / r (or / sqrt(r)) itself is the layer's: tests/test_layer.py
    assert LoRAConfig(r=8).alpha_for("x.q_proj") == 16
    assert LoRAConfig(r=8, alpha=12).alpha_for("x.q_proj") == 12


def test_rank_and_alpha_patterns_match_the_end_of_module_names():
    config = LoRAConfig(r=8, alpha=16, rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
                        alpha_pattern={"v_proj": 3})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert config.rank_for("model.layers.1.mlp.down_proj") == 2
    assert config.rank_for("model.layers.11.mlp.down_proj") == 8  # "layers.1" is not a suffix of "layers.11"
    assert config.rank_for("model.layers.0.self_attn.xq_proj") == 8  # whole name parts only
    assert config.alpha_for("model.layers.0.self_attn.v_proj") == 3
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 16  # alpha stays when only r has a pattern


def test_pattern_key_agrees_with_peft():
    from peft.utils.other import get_pattern_key  # the reference implementation of the rule

    patterns = {"q_proj": 1, "layers.1.mlp.down_proj": 2, r"layers\.[01]\.self_attn\.v_proj": 3, "up": 4}
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj",
             "model.layers.0.self_attn.v_proj", "model.layers.2.self_attn.v_proj", "model.layers.0.mlp.up_proj",
             "q_proj", "model.layers.0.self_attn.xq_proj"]
    for name in names:
        theirs = get_pattern_key(list(patterns), name)  # returns the name itself when no key matches
        assert pattern_key(patterns, name) == (theirs if theirs in patterns else None), name


def test_list_targets_match_whole_name_parts_and_strings_are_full_regexes():
    assert matches(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert matches(["q_proj"], "q_proj")
    assert not matches(["q_proj"], "model.layers.0.self_attn.xq_proj")
    assert matches(["self_attn.q_proj"], "model.layers.0.self_attn.q_proj")
    assert matches(r".*\.(q|v)_proj", "model.layers.0.self_attn.v_proj")
    assert not matches(r"(q|v)_proj", "model.layers.0.self_attn.v_proj")  # a regex must match the whole name


def test_layers_to_transform_limits_by_layer_index():
    config = LoRAConfig(layers_to_transform=1)
    assert config.layers_to_transform == [1]
    assert config.selects("model.layers.1.self_attn.q_proj")
    assert not config.selects("model.layers.0.self_attn.q_proj")
    assert not config.selects("model.layers.11.self_attn.q_proj")


def test_exclude_modules_wins_over_targets():
    config = LoRAConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.v_proj"])
    assert config.selects("model.layers.1.self_attn.v_proj")
    assert not config.selects("model.layers.0.self_attn.v_proj")


@pytest.mark.parametrize("fields, words", [
    (dict(r=0), ["r=0", "positive integer"]),
    (dict(r=-4), ["r=-4", "positive integer"]),
    (dict(r=2.5), ["r=2.5", "positive integer"]),
    (dict(alpha=0), ["alpha=0", "positive"]),
    (dict(alpha=-1.0), ["alpha=-1.0", "positive"]),
    (dict(alpha=float("nan")), ["alpha=nan", "positive"]),
    (dict(dropout=1.0), ["dropout=1.0", "[0, 1)"]),
    (dict(dropout=-0.1), ["dropout=-0.1", "[0, 1)"]),
    (dict(bias="some"), ["bias='some'", "none, all, lora_only"]),
    (dict(init="xavier"), ["init='xavier'", "kaiming, gaussian"]),
    (dict(target_modules=[]), ["target_modules=[]", "all-linear"]),
    (dict(rank_pattern={"q_proj": 0}), ["rank_pattern['q_proj']=0", "positive integer"]),
    (dict(alpha_pattern={"q_proj": -2}), ["alpha_pattern['q_proj']=-2", "positive"]),
    (dict(layers_to_transform=[-1]), ["layers_to_transform=[-1]", "non-negative"]),
    (dict(target_modules=r".*q_proj", layers_to_transform=[0]), ["regex target_modules='.*q_proj'", "in the regex"]),
    # issue 30: each modules_to_save entry is a regex inside PEFT's rule, checked as target_modules is
    (dict(modules_to_save=["(a|aa)*(.*)*x"]), ["modules_to_save entry='(a|aa)*(.*)*x'", "exponential time"]),
    (dict(modules_to_save=["lm_head("]), ["modules_to_save entry='lm_head('", "not a valid regex",
                                          "module-name endings such as 'lm_head'"]),
    (dict(layers_to_transform=[True]), ["layers_to_transform=[True]", "non-negative layer indices"]),  # not layer 1
    (dict(layers_to_transform=True), ["layers_to_transform=[True]", "non-negative layer indices"]),
    (dict(use_rslora="false"), ["use_rslora='false'", "True or False"]),  # a truthy string
    (dict(exclude_modules=["lm_head", 3]), ["exclude_modules=['lm_head', 3]", "module-name endings"]),
    (dict(exclude_modules=5), ["exclude_modules=5", "module-name endings"]),
])
def test_bad_settings_raise_value_error_naming_the_setting(fields, words):
    with pytest.raises(ValueError) as info:
        LoRAConfig(**fields)
    for word in words:
        assert word in str(info.value)


def test_replace_validates_too():
    with pytest.raises(ValueError, match="r=0"):
        LoRAConfig().replace(r=0)


def test_peft_names_and_task_type_are_accepted_by_the_constructor_and_by_inject(tmp_path):
    config = LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM")
    assert (config.alpha, config.dropout, config.task_type) == (16, 0.05, "CAUSAL_LM")
    assert LoRAConfig(init_lora_weights="gaussian").init == "gaussian" and LoRAConfig(init_lora_weights=True).init == "kaiming"
    model = minilora.inject(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"], task_type="SEQ_CLS")
    minilora.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert minilora.read_adapter_config(str(tmp_path))[0].task_type == "SEQ_CLS"


@pytest.mark.parametrize("fields, error, words", [
    (dict(alpha=8, lora_alpha=16), ValueError, "alpha or lora_alpha"),
    (dict(lora_rank=8), TypeError, "unknown LoRA setting.*lora_rank.*lora_alpha"),
    (dict(task_type="CAUSAL"), ValueError, "task_type='CAUSAL'.*CAUSAL_LM"),
    (dict(init_lora_weights="pissa"), ValueError, "init_lora_weights='pissa'.*not implemented"),
    (dict(modules_to_save=[""]), ValueError, "modules_to_save"),
])
def test_peft_style_mistakes_name_the_setting(fields, error, words):
    with pytest.raises(error, match=words):
        LoRAConfig(**fields)


def test_an_unknown_task_type_in_a_file_loads_with_a_warning(tmp_path):
    minilora.save_adapter(minilora.inject(tiny_llama(), r=4, target_modules=["q_proj"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"CAUSAL_LM"', '"NEW_TASK"'))
    with pytest.warns(UserWarning, match="task_type='NEW_TASK'"):
        assert minilora.read_adapter_config(str(tmp_path))[0].task_type is None
