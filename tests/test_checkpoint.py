"""Loading adapters (minilora/checkpoint.py): a round trip is exact, and loading is strict (every
mismatch raises AdapterLoadError naming it, and leaves the model as it was). What is written:
tests/test_save.py."""

import json
import math
import os
import pickle
import re
import struct
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora
from conftest import randomize_adapters, tiny_llama
from minilora import AdapterLoadError, LoRALinear

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def randomize_biases(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def trained(config, model_fields=None, adapter_name="default"):
    model = minilora.inject(tiny_llama(**(model_fields or {})), adapter_name=adapter_name, **config)
    return randomize_biases(randomize_adapters(model))


# Configurations as minilora.inject takes them, with the same adapter as a peft.LoraConfig.
CASES = {
    "q_v": (dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), {},
            dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "seven_rslora_dropout": (dict(r=8, alpha=16, use_rslora=True, dropout=0.1), {},
                             dict(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1,
                                  target_modules=list(minilora.LLAMA_TARGETS))),
    "patterns": (dict(r=8, alpha=16, rank_pattern={"v_proj": 2, "down_proj": 4}, alpha_pattern={"q_proj": 4}), {},
                 dict(r=8, lora_alpha=16, rank_pattern={"v_proj": 2, "down_proj": 4}, alpha_pattern={"q_proj": 4},
                      target_modules=list(minilora.LLAMA_TARGETS))),
    "all_linear_exclude": (dict(r=4, alpha=4, target_modules="all-linear", exclude_modules=["down_proj"]), {},
                           dict(r=4, lora_alpha=4, target_modules="all-linear", exclude_modules=["down_proj"])),
    "layer_1_gaussian": (dict(r=4, target_modules=["q_proj", "o_proj"], layers_to_transform=[1], init="gaussian"),
                         {}, dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], layers_to_transform=[1],
                                  init_lora_weights="gaussian")),
    "bias_all": (dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], bias="all"), dict(attention_bias=True),
                 dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all")),
    "bias_lora_only": (dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only"),
                       dict(attention_bias=True),
                       dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only")),
}


def test_save_then_load_into_a_fresh_base_reproduces_the_logits_exactly(tmp_path):
    model = trained(CASES["patterns"][0])
    minilora.save_adapter(model, tmp_path)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    loaded = minilora.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert minilora.active_adapter(loaded) == "default"


def test_trained_biases_travel_with_the_adapter(tmp_path):
    model = trained(CASES["bias_all"][0], CASES["bias_all"][1])
    minilora.save_adapter(model, tmp_path)
    loaded = minilora.load_adapter(tiny_llama(attention_bias=True), tmp_path)
    assert not torch.equal(loaded(IDS).logits, tiny_llama(attention_bias=True)(IDS).logits)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_is_trainable_decides_whether_the_loaded_adapter_trains(tmp_path):
    minilora.save_adapter(trained(CASES["q_v"][0]), tmp_path)
    frozen = minilora.load_adapter(tiny_llama(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    training = minilora.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in training.named_parameters() if p.requires_grad} == \
           {n for n, _ in minilora.lora_parameters(training)}


def test_a_second_adapter_loads_under_another_name(tmp_path):
    minilora.save_adapter(trained(CASES["q_v"][0]), tmp_path)
    model = minilora.load_adapter(tiny_llama(), tmp_path, adapter_name="a")
    with pytest.raises(AdapterLoadError, match="already has an adapter named 'a'"):
        minilora.load_adapter(model, tmp_path, adapter_name="a")
    minilora.load_adapter(model, tmp_path, adapter_name="b")
    assert minilora.adapter_names(model) == ["a", "b"] and minilora.active_adapter(model) == "b"


# -- strict loading -------------------------------------------------------------------------------

def assert_untouched(model, reference):
    """The model after a failed load is the model before it: no LoRA layers, the same flags and outputs."""
    assert not list(minilora.lora_modules(model)) and minilora.adapter_names(model) == []
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]
    assert torch.equal(model(IDS).logits, reference(IDS).logits)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "adapter"
    minilora.save_adapter(trained(CASES["q_v"][0]), path)
    return path


def rewrite_weights(path, change):
    state = load_file(path / "adapter_model.safetensors")
    change(state)
    save_file(state, path / "adapter_model.safetensors")


def rewrite_config(path, change):
    config = json.loads((path / "adapter_config.json").read_text())
    change(config)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_a_key_missing_from_the_file_raises_naming_it(saved):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    rewrite_weights(saved, lambda state: state.pop(key))
    model = tiny_llama()
    with pytest.raises(AdapterLoadError, match=f"missing from file: {key}"):
        minilora.load_adapter(model, saved)
    assert_untouched(model, tiny_llama())


def test_an_unexpected_key_in_the_file_raises_naming_it(saved):
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    rewrite_weights(saved, lambda state: state.__setitem__(key, torch.zeros(4, 64)))
    model = tiny_llama()
    with pytest.raises(AdapterLoadError, match=f"unexpected in file: {key}"):
        minilora.load_adapter(model, saved)
    assert_untouched(model, tiny_llama())


def test_a_shape_mismatch_raises_naming_key_and_both_shapes(saved):
    rewrite_config(saved, lambda config: config.update(r=8, lora_alpha=16))
    model = tiny_llama()
    for p in model.model.layers[0].mlp.parameters():  # a user's own trainable choice survives the failure
        p.requires_grad_(False)
    reference = tiny_llama()
    for p in reference.model.layers[0].mlp.parameters():
        p.requires_grad_(False)
    with pytest.raises(AdapterLoadError) as info:
        minilora.load_adapter(model, saved)
    assert ("shape mismatch base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: "
            "file (4, 64) vs model (8, 64)") in str(info.value)
    assert_untouched(model, reference)


def test_an_adapter_for_another_base_size_does_not_load(saved):
    smaller = dict(hidden_size=32, intermediate_size=64)
    model = tiny_llama(**smaller)
    with pytest.raises(AdapterLoadError) as info:
        minilora.load_adapter(model, saved)
    assert "does not fit this model" in str(info.value)
    assert "file (4, 64) vs model (4, 32)" in str(info.value)
    assert_untouched(model, tiny_llama(**smaller))


def test_an_adapter_for_other_module_names_does_not_load(saved):
    rewrite_config(saved, lambda config: config.update(target_modules=["c_attn"], base_model_name_or_path="gpt2"))
    model = tiny_llama()
    with pytest.raises(AdapterLoadError) as info:
        minilora.load_adapter(model, saved)
    message = str(info.value)
    assert "does not fit this model (it was trained on gpt2)" in message and "c_attn" in message
    assert "q_proj, k_proj, v_proj" in message  # what this model does have
    assert_untouched(model, tiny_llama())


def test_a_pickle_file_is_refused_and_never_unpickled(tmp_path, saved):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):  # unpickling this would create the marker file
            return open, (str(marker), "w")

    os.remove(saved / "adapter_model.safetensors")
    (saved / "adapter_model.bin").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(AdapterLoadError) as info:
        minilora.load_adapter(tiny_llama(), saved)
    assert "adapter_model.bin" in str(info.value) and "pickle" in str(info.value)
    assert "arbitrary code" in str(info.value) and "safetensors" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage, words", [
    (lambda p: os.remove(p / "adapter_config.json"), "has no adapter_config.json"),
    (lambda p: (p / "adapter_config.json").write_text("{r: 4"), "is not valid JSON"),
    (lambda p: os.remove(p / "adapter_model.safetensors"), "has no adapter_model.safetensors"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00"), "truncated or corrupted"),
    (lambda p: rewrite_config(p, lambda c: c.update(lora_bias=True)), "lora_bias=True is not supported"),
    (lambda p: rewrite_config(p, lambda c: c.update(peft_type="IA3")), "only LORA adapters"),
    (lambda p: rewrite_config(p, lambda c: c.update(init_lora_weights="pissa")), "rewrote the base weights"),
    (lambda p: rewrite_config(p, lambda c: c.update(r="4")), "r='4' should be int"),
    (lambda p: rewrite_config(p, lambda c: c.update(lora_alpha=-8)), "alpha=-8"),
    (lambda p: rewrite_config(p, lambda c: c.update(bias="some")), "bias='some'"),
    (lambda p: (p / "adapter_config.json").write_text('{"r": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     "nests JSON too deeply"),  # a raw RecursionError
])
def test_damaged_or_unsupported_adapters_raise_adapter_load_error(saved, damage, words):
    damage(saved)
    model = tiny_llama()
    with pytest.raises(AdapterLoadError, match=words.replace("(", r"\(").replace(")", r"\)")):
        minilora.load_adapter(model, saved)
    assert_untouched(model, tiny_llama())


def test_a_missing_directory_raises_adapter_load_error(tmp_path):
    with pytest.raises(AdapterLoadError, match="no adapter directory"):
        minilora.load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_unknown_config_fields_from_a_newer_peft_are_ignored_with_a_warning(saved):
    rewrite_config(saved, lambda config: config.update(future_option=None, another_one=3))
    with pytest.warns(UserWarning, match="ignoring fields.*another_one, future_option"):
        model = minilora.load_adapter(tiny_llama(), saved)
    assert minilora.adapter_names(model) == ["default"]


def test_an_adapter_saved_by_the_installed_peft_loads_without_warnings(tmp_path):
    import peft

    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = minilora.load_adapter(tiny_llama(), tmp_path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)


# -- hostile or diverged adapters (issue 18): refused before anything is built --------------------

def _nan_in_lora_b(state):
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key][0, :] = float("nan")


@pytest.mark.parametrize("change_weights, change_config, words", [
    (_nan_in_lora_b, None, "non-finite value(s) (NaN or inf)"),
    (lambda s: s.update({k: v.to(torch.int8) for k, v in s.items()}), None, "holds torch.int8 values"),
    (None, lambda c: c.update(r=5_000_000), "shape mismatch"),  # the 1.28 GB allocation the issue saw
    (None, lambda c: c.update(r=2**62), "shape mismatch"),
    (None, lambda c: c.update(target_modules="(.*)*x"), "exponential time"),
    (None, lambda c: c.update(target_modules="(q_proj"), "is not a valid regex"),
    (None, lambda c: c.update(rank_pattern={"(a+)+": 4}), "exponential time"),
    (None, lambda c: c.update(target_modules=["q_proj", 7]), "give a list of module-name endings"),
    # issue 30: modules_to_save entries reached re.match unchecked (a hang; a raw re.error)
    (None, lambda c: c.update(modules_to_save=["(a|aa)*(.*)*x"]), "exponential time"),
    (None, lambda c: c.update(modules_to_save=["lm_head("]), "is not a valid regex"),
    (None, lambda c: c.update(exclude_modules=["k_proj", 7]), "a regex string, or None"),  # a raw TypeError
    (None, lambda c: c.update(layers_to_transform=[True]), "give non-negative layer indices"),
], ids=["nan-weight", "integer-weight", "huge-rank", "overflowing-rank", "catastrophic-regex", "invalid-regex",
        "catastrophic-rank-pattern", "non-text-target", "catastrophic-modules-to-save", "invalid-modules-to-save",
        "non-text-exclude", "boolean-layer"])
def test_a_hostile_or_diverged_adapter_is_refused_before_any_layer_is_built(saved, change_weights, change_config,
                                                                           words, monkeypatch):
    if change_weights:
        rewrite_weights(saved, change_weights)
    if change_config:
        rewrite_config(saved, change_config)
    built = []
    monkeypatch.setattr(LoRALinear, "add_adapter", lambda self, *a, **k: built.append(a))  # must not be reached
    model, reference = tiny_llama(), tiny_llama()
    with pytest.raises(AdapterLoadError, match=words.replace("(", r"\(").replace(")", r"\)")):
        minilora.load_adapter(model, saved)
    assert built == []
    assert_untouched(model, reference)


@pytest.mark.parametrize("name", ["with.dot", "", " padded", "/some/absolute/path", "forward", "train"])
def test_an_adapter_name_that_is_not_a_plain_name_is_refused_and_nothing_changes(saved, name):
    model, reference = tiny_llama(), tiny_llama()
    with pytest.raises(AdapterLoadError, match="adapter_name=.*(a plain name|nn.ModuleDict)"):
        minilora.load_adapter(model, saved, adapter_name=name)
    assert_untouched(model, reference)


def test_any_failure_after_injection_rolls_the_model_back(saved, monkeypatch):
    """Even an error nobody anticipated while copying (here a KeyboardInterrupt) leaves the model as it was."""
    import minilora.checkpoint as checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_copy_strict", interrupted)
    model, reference = tiny_llama(), tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        minilora.load_adapter(model, saved)
    assert_untouched(model, reference)


def test_a_nan_adapter_cannot_reach_a_merged_model(saved):
    """What minilora-generate --merge runs: load_lora_model(merge=True) stops at the load."""
    from minilora_train.inference import load_lora_model

    rewrite_weights(saved, _nan_in_lora_b)
    base_dir = saved.parent / "base"
    tiny_llama().save_pretrained(base_dir)
    with pytest.raises(AdapterLoadError, match="non-finite"):
        load_lora_model(str(base_dir), str(saved), merge=True, device="cpu")


def test_a_broken_symlink_is_reported_as_one(saved):
    weights = saved / "adapter_model.safetensors"
    os.replace(weights, saved / "elsewhere.safetensors")
    os.symlink(saved / "moved-away.safetensors", weights)
    with pytest.raises(AdapterLoadError, match="is a symbolic link to .*moved-away.safetensors.*, which does not exist"):
        minilora.load_adapter(tiny_llama(), saved)


# -- a header that claims more than the file can hold for this model (issue 30) ---------------------

def write_with_a_huge_tensor(path, key, shape):
    """The adapter at ``path`` plus (or with, in place of its own) tensor ``key`` of ``shape`` in
    float32, whose bytes are a hole at the end of a sparse file: the file is that large, on no disk."""
    state = load_file(path / "adapter_model.safetensors")
    state.pop(key, None)
    header, offset, data = {}, 0, []
    for name, tensor in state.items():
        raw = tensor.float().contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data.append(raw)
    size = math.prod(shape) * 4
    header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    with open(path / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(data))
        f.truncate(8 + len(text) + offset + size)


def refuse_to_read(monkeypatch):
    import minilora.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_read_weights", lambda path: pytest.fail("tensors read before the header check"))


@pytest.mark.parametrize("key, shape, words", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (4, 750_000_000),
     "shape mismatch base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: file (4, 750000000) vs model "
     "(4, 64)"),
    ("base_model.model.lm_head.weight", (25_000_000, 120), "file (25000000, 120) vs model (128, 64)"),
    ("base_model.model.stowaway", (3_000_000_000,), "unexpected in file: base_model.model.stowaway"),
], ids=["adapter-tensor", "model-tensor", "no-such-tensor"])
def test_a_header_claiming_a_12_gb_tensor_is_refused_before_any_tensor_is_read(saved, monkeypatch, key, shape, words):
    """Every tensor was read before any name or shape was checked: under a memory limit "Cannot
    allocate memory", without one 12 GB allocated. The header (safe_open) is checked first."""
    write_with_a_huge_tensor(saved, key, shape)
    assert os.path.getsize(saved / "adapter_model.safetensors") > 12e9
    refuse_to_read(monkeypatch)
    model, reference = tiny_llama(), tiny_llama()
    with pytest.raises(AdapterLoadError, match=re.escape(words)):
        minilora.load_adapter(model, saved)
    assert_untouched(model, reference)


def test_resuming_checks_the_header_before_reading_too(saved, monkeypatch):
    from minilora.checkpoint import load_adapter_weights

    model = minilora.inject(tiny_llama(), **CASES["q_v"][0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_with_a_huge_tensor(saved, "base_model.model.stowaway", (3_000_000_000,))
    refuse_to_read(monkeypatch)
    with pytest.raises(AdapterLoadError, match="unexpected in file: base_model.model.stowaway"):
        load_adapter_weights(model, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
