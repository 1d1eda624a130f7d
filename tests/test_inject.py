"""inject and the parameter helpers: what gets adapted, what trains, what is counted, and the
errors for targets that cannot work."""

import os
import pickle

import pytest
import torch
from torch import nn

import minilora
from conftest import randomize_adapters, tiny_llama
from minilora import LoRAConfig, LoRALinear

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(model):
    return sorted(name for name, _ in minilora.lora_modules(model))


def test_default_targets_are_the_seven_llama_projections_and_not_the_head():
    model = minilora.inject(tiny_llama())
    assert len(adapted(model)) == 2 * 7
    assert {n.rsplit(".", 1)[-1] for n in adapted(model)} == set(SEVEN)
    assert type(model.lm_head) is nn.Linear


def test_list_regex_and_all_linear_targets():
    model = minilora.inject(tiny_llama(), target_modules=["q_proj", "mlp.down_proj"])
    assert adapted(model) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                              "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    model = minilora.inject(tiny_llama(), target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    assert adapted(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = minilora.inject(tiny_llama(), target_modules="all-linear")
    assert len(adapted(model)) == 2 * 7 and type(model.lm_head) is nn.Linear


def test_exclude_modules_and_layers_to_transform_narrow_the_targets():
    model = minilora.inject(tiny_llama(), target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    assert {n.rsplit(".", 1)[-1] for n in adapted(model)} == {"q_proj"}
    model = minilora.inject(tiny_llama(), layers_to_transform=[1])
    assert all(".layers.1." in n for n in adapted(model)) and len(adapted(model)) == 7
    model = minilora.inject(tiny_llama(), target_modules="all-linear", layers_to_transform=0)
    assert all(".layers.0." in n for n in adapted(model)) and len(adapted(model)) == 7


def test_config_and_keyword_fields_combine_with_fields_winning():
    model = minilora.inject(tiny_llama(), LoRAConfig(r=8, target_modules=["q_proj"]), r=2)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.shape == (2, 64) and layer.scaling == 2.0  # alpha defaults to 2 * r


def test_rank_pattern_sets_per_module_ranks():
    model = minilora.inject(tiny_llama(), r=8, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 1})
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.lora_A.shape == (8, 64) and attention.v_proj.lora_A.shape == (2, 64)
    assert attention.v_proj.scaling == 0.5


def test_base_state_dict_keys_and_tensors_are_unchanged_by_inject():
    model = tiny_llama()
    before = model.state_dict()
    minilora.inject(model)
    after = model.state_dict()
    assert set(before) <= set(after)
    assert all(".adapters." in k for k in set(after) - set(before))
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)  # the same tensors, not copies


def test_fresh_injection_gives_exactly_the_base_logits():
    ids = torch.randint(3, 128, (2, 12))
    base_logits = tiny_llama()(ids).logits
    model = minilora.inject(tiny_llama(), target_modules="all-linear", r=8)
    assert torch.equal(model(ids).logits, base_logits)


def test_a_bf16_model_gets_float32_adapters_and_still_returns_bf16():
    model = randomize_adapters(minilora.inject(tiny_llama().to(torch.bfloat16), r=4))
    assert {p.dtype for _, p in minilora.lora_parameters(model)} == {torch.float32}
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model(torch.randint(3, 128, (1, 8))).logits.dtype == torch.bfloat16


def test_injecting_into_an_eval_model_keeps_dropout_off():
    model = randomize_adapters(minilora.inject(tiny_llama(), dropout=0.5))  # tiny_llama() is in eval mode
    ids = torch.randint(3, 128, (1, 8))
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_only_the_adapter_trains():
    model = minilora.inject(tiny_llama(), r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in minilora.lora_parameters(model)}
    assert len(trainable) == 2 * 7 * 2


@pytest.mark.parametrize("bias, expected", [
    ("none", set()),
    ("all", {"q_proj", "k_proj", "v_proj", "o_proj"}),  # attention_bias=True gives these four biases
    ("lora_only", {"q_proj", "v_proj"}),
])
def test_bias_modes_choose_which_biases_train(bias, expected):
    model = minilora.inject(tiny_llama(attention_bias=True), target_modules=["q_proj", "v_proj"], bias=bias)
    biases = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    assert biases == expected


def test_only_adapter_params_get_gradients_and_base_stays_bit_identical():
    model = minilora.inject(tiny_llama(), r=4)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # AdamW over *all* parameters with weight decay: a frozen weight would still decay if it had a grad.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    ids = torch.randint(3, 128, (2, 16))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert all(torch.count_nonzero(p) > 0 for n, p in minilora.lora_parameters(model) if n.endswith("lora_B"))


def test_mark_only_lora_trainable_refuses_an_unknown_adapter_name():
    """It froze every parameter and trained nothing, silently (issue 30's search for siblings)."""
    model = minilora.inject(minilora.inject(tiny_llama(), r=2, adapter_name="a"), r=2, adapter_name="b")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="unknown adapter 'c'; the model has: a, b"):
        minilora.mark_only_lora_trainable(model, adapter_name="c")
    assert [p.requires_grad for p in model.parameters()] == flags


def test_mark_only_lora_trainable_refreezes_after_user_changes():
    model = minilora.inject(tiny_llama(attention_bias=True), target_modules=["q_proj"])
    for p in model.parameters():
        p.requires_grad_(True)
    minilora.mark_only_lora_trainable(model, bias="lora_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in minilora.lora_parameters(model)} | {
        "model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.bias"}
    with pytest.raises(ValueError, match="bias='every' is not one of none, all, lora_only"):
        minilora.mark_only_lora_trainable(model, bias="every")


# Llama-3.2-1B's architecture (its config.json on the Hub), built on the meta device: no memory, no
# download. Base size 1,235,814,400 (tied embeddings counted once).
def llama_3_2_1b_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def llama_1b():
    return llama_3_2_1b_on_meta()


# Per layer an adapter on (in, out) adds r * (in + out): q and o are 2048 -> 2048, k and v 2048 -> 512,
# gate and up 2048 -> 8192, down 8192 -> 2048. So all seven add r * 44032 per layer, r * 704512 over
# 16 layers; these are also the numbers PEFT's print_trainable_parameters reports for the same configs.
@pytest.mark.parametrize("r, targets, trainable", [
    (16, SEVEN, 11_272_192),                                      # 16 * 704512
    (16, ["q_proj", "k_proj", "v_proj", "o_proj"], 3_407_872),    # 16 * 16 * (4096 + 2560 + 2560 + 4096)
    (16, ["q_proj", "v_proj", "gate_proj", "down_proj"], 6_946_816),  # 16 * 16 * (4096 + 2560 + 10240 * 2)
    (8, SEVEN, 5_636_096),                                        # 8 * 704512
    (64, SEVEN, 45_088_768),                                      # 64 * 704512
])
def test_parameter_counts_on_llama_3_2_1b(llama_1b, r, targets, trainable):
    for name in minilora.adapter_names(llama_1b):  # the fixture is shared: start from the bare base
        minilora.delete_adapter(llama_1b, name)
    minilora.inject(llama_1b, r=r, target_modules=targets)
    assert minilora.count_parameters(llama_1b) == (trainable, 1_235_814_400 + trainable)


def test_llama_3_2_1b_on_meta_has_the_published_size():
    assert minilora.count_parameters(llama_3_2_1b_on_meta()) == (1_235_814_400, 1_235_814_400)


def test_print_trainable_parameters_prints_peft_s_line(capsys):
    model = minilora.inject(llama_3_2_1b_on_meta(), r=16)
    minilora.print_trainable_parameters(model)
    assert capsys.readouterr().out == (
        "trainable params: 11,272,192 || all params: 1,247,086,592 || trainable%: 0.9039\n")


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_quantized_base_counts_the_parameters_it_stands_for(scheme):
    model = tiny_llama(tie_word_embeddings=False)
    minilora.inject(model, r=4)
    before = minilora.count_parameters(model)
    minilora.quantize(model, scheme, embeddings=True)
    assert minilora.count_parameters(model) == before  # codes are buffers, yet still the model's weights


def test_count_parameters_counts_tied_weights_once():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert minilora.count_parameters(model)[1] == sum(p.numel() for p in set(model.parameters()))


# -- errors ---------------------------------------------------------------------------------------

def test_targets_that_match_nothing_list_the_linear_name_endings():
    with pytest.raises(ValueError) as info:
        minilora.inject(tiny_llama(), target_modules=["qproj"])
    message = str(info.value)
    assert "no module matched target_modules=['qproj']" in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in message


def test_a_target_that_is_not_linear_is_refused():
    with pytest.raises(ValueError) as info:
        minilora.inject(tiny_llama(), target_modules=["self_attn"])
    message = str(info.value)
    assert "'model.layers.0.self_attn', a LlamaAttention" in message and "nn.Linear and nn.Embedding modules only" in message
    assert "q_proj" in message


def test_injecting_the_same_adapter_name_twice_is_refused():
    model = minilora.inject(tiny_llama())
    with pytest.raises(ValueError, match="already has an adapter named 'default'.*delete_adapter"):
        minilora.inject(model)


@pytest.mark.parametrize("fields, words", [
    (dict(r=0), "r=0"), (dict(alpha=0), "alpha=0"), (dict(dropout=1.5), "dropout=1.5"), (dict(bias="x"), "bias='x'"),
])
def test_bad_settings_passed_to_inject_raise_and_leave_the_model_alone(fields, words):
    model = tiny_llama()
    with pytest.raises(ValueError, match=words):
        minilora.inject(model, **fields)
    assert adapted(model) == []
    assert all(p.requires_grad for p in model.parameters())


def test_inject_into_a_merged_model_is_refused():
    model = minilora.merge(minilora.inject(tiny_llama(), adapter_name="a"))
    with pytest.raises(ValueError, match="merged adapter.*unmerge"):
        minilora.inject(model, adapter_name="b")


def test_inject_takes_peft_setting_names_and_names_the_settings_on_a_typo():
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8))
    minilora.inject(model, r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["0"])
    adapter = model[0].adapters["default"]
    assert (adapter.scaling, adapter.dropout.p) == (4.0, 0.05)
    with pytest.raises(ValueError, match="alpha or lora_alpha"):
        minilora.inject(nn.Sequential(nn.Linear(8, 8)), r=4, alpha=8, lora_alpha=16, target_modules=["0"])
    with pytest.raises(TypeError, match="lora_alpa.*the settings are .*lora_dropout"):
        minilora.inject(nn.Sequential(nn.Linear(8, 8)), r=4, lora_alpa=16, target_modules=["0"])


# -- layers LoRA cannot stand in for (issue 14's quantized-layer guard, issue 18 item 4) ------------

class Int8Linear(nn.Linear):
    """bitsandbytes' Linear8bitLt in miniature: an int8 weight with a scale, and its own forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter((linear.weight.detach() / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype) * self.scale, self.bias)


class Int8WeightLinear(nn.Linear):
    """A Linear with nn.Linear's forward but a quantized (uint8) weight, as Linear4bit stores it."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = nn.Parameter(torch.zeros(linear.out_features, linear.in_features // 2, dtype=torch.uint8),
                                   requires_grad=False)


class ScaledLinear(nn.Linear):
    """A subclass whose forward does more than x Wᵀ + b (issue 18 item 4)."""

    def forward(self, x):
        return 2 * super().forward(x)


def with_layer(cls, where="q_proj"):
    model = tiny_llama()
    attention = model.model.layers[1].self_attn
    setattr(attention, where, cls(getattr(attention, where)) if cls is not ScaledLinear
            else ScaledLinear(64, getattr(attention, where).out_features, bias=False))
    return model


@pytest.mark.parametrize("cls, words", [
    (Int8Linear, "Int8Linear, an nn.Linear subclass with its own forward"),
    (Int8WeightLinear, "Int8WeightLinear whose weight is a torch.uint8 Parameter, not a floating-point tensor"),
    (ScaledLinear, "ScaledLinear, an nn.Linear subclass with its own forward"),
], ids=["int8-own-forward", "uint8-weight", "own-forward"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", r".*\.q_proj"], ids=["list", "all-linear", "regex"])
def test_a_layer_lora_cannot_stand_in_for_is_refused_at_inject_and_nothing_changes(cls, words, targets):
    model = with_layer(cls)
    ids = torch.randint(3, 128, (2, 8))
    before = model(ids).logits if cls is not Int8WeightLinear else None
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(minilora.UnsupportedLayerError,
                       match=f"cannot adapt 'model.layers.1.self_attn.q_proj': it is a {words}"):
        minilora.inject(model, r=4, target_modules=targets)
    assert not list(minilora.lora_modules(model)) and minilora.adapter_names(model) == []
    assert [p.requires_grad for p in model.parameters()] == flags
    if before is not None:
        assert torch.equal(model(ids).logits, before)
    # Leaving it out is the way forward, and that works.
    minilora.inject(model, r=4, target_modules=targets if targets != r".*\.q_proj" else r".*\.v_proj",
                    exclude_modules=["layers.1.self_attn.q_proj"])


def test_the_guard_is_what_made_wrapping_wrong():
    """Without the guard, a fresh adapter (B = 0) on the subclass already changed the logits."""
    from minilora.layer import LoRALinear

    layer = ScaledLinear(8, 8)
    x = torch.randn(3, 8)
    assert not torch.allclose(LoRALinear(layer)(x), layer(x))


def test_an_admitted_linear_type_is_adapted():
    """A subclass minilora itself supports (its own quantized base) is admitted by class."""
    from minilora.inject import _ADMITTED_LINEAR_TYPES, admit_linear_type

    class PlainSubclass(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    admit_linear_type(PlainSubclass)
    try:
        model = tiny_llama()
        old = model.model.layers[0].self_attn.q_proj
        model.model.layers[0].self_attn.q_proj = PlainSubclass(old.in_features, old.out_features, bias=False)
        minilora.inject(model, r=4, target_modules=["q_proj"])
        assert len(list(minilora.lora_modules(model))) == 2
    finally:
        _ADMITTED_LINEAR_TYPES.discard(PlainSubclass)


def test_an_adapted_model_pickles_and_its_copy_is_whole(tmp_path):
    """pickle.dumps failed on a local hook function (issue 30), so torch.save(model) and sending the
    model to another process did, while state_dict and deepcopy worked. The copy computes the same,
    saves its own adapter, and its hook serves the copy."""
    model = randomize_adapters(minilora.inject(tiny_llama(), r=4))
    minilora.enable_input_require_grads(model)
    copy = pickle.loads(pickle.dumps(model))
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(copy(ids).logits, model(ids).logits)
    assert copy.model.embed_tokens(ids).requires_grad
    copy.save_pretrained(tmp_path)
    assert torch.equal(minilora.load_adapter(tiny_llama(), tmp_path)(ids).logits, model(ids).logits)


# -- inject is all or nothing ----------------------------------------------------------------------

def test_a_rank_that_cannot_be_allocated_leaves_the_model_as_it_was():
    model = minilora.inject(tiny_llama(), r=4, adapter_name="first")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=r"adapter 'second' could not be built .*the model was left as it was"):
        minilora.inject(model, r=2**62, adapter_name="second")
    assert [n for n, _ in model.named_modules()] == names
    assert minilora.adapter_names(model) == ["first"] and minilora.active_adapter(model) == "first"


@pytest.mark.parametrize("name, words", [
    ("a.b", "a plain name of letters, digits"), ("", "a plain name"), (3, "a plain name"), (" padded", "a plain name"),
    # issue 30: a path escaped save_pretrained's folder; ModuleDict's attributes raised a raw KeyError
    ("/some/absolute/path", "no dots, slashes or spaces"), ("../up", "no dots, slashes"), ("a\\b", "slashes"),
    ("forward", "attribute of torch's nn.ModuleDict"), ("train", "attribute of torch's nn.ModuleDict"),
])
def test_an_adapter_name_that_is_not_a_plain_name_is_refused_and_nothing_changes(name, words):
    model = tiny_llama()
    with pytest.raises(ValueError, match=words):
        minilora.inject(model, adapter_name=name)
    assert not list(minilora.lora_modules(model)) and all(p.requires_grad for p in model.parameters())


def test_no_adapter_name_makes_save_pretrained_write_outside_its_folder(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="a plain name"):
        minilora.inject(model, adapter_name=str(tmp_path / "elsewhere"))
    minilora.inject(model, adapter_name="cardiology-v2")  # letters, digits, '-' and '_' are plain
    model.save_pretrained(tmp_path / "folder")
    assert sorted(os.listdir(tmp_path)) == ["folder"]
    assert sorted(os.listdir(tmp_path / "folder")) == ["cardiology-v2"]


def test_a_string_target_that_only_matches_name_endings_says_how_strings_match():
    with pytest.raises(ValueError, match=r"A string is a regex that must match the whole module name \(such as "
                                         r"'model.layers.0.self_attn.q_proj'\); for name endings give a list, "
                                         r"e.g. \['q_proj'\]"):
        minilora.inject(tiny_llama(), target_modules="q_proj")


@pytest.mark.parametrize("module", [nn.Linear(0, 64), nn.Linear(64, 0), nn.Embedding(0, 64)],
                         ids=["linear-in-0", "linear-out-0", "embedding-0"])
def test_a_layer_of_zero_size_is_refused_with_its_name_and_shape(module):
    """torch's own errors came from deep inside ("cannot reshape tensor of 0 elements", at the first forward)."""
    model = tiny_llama()
    model.model.layers[0].extra = module
    with pytest.raises(minilora.UnsupportedLayerError, match=r"'model.layers.0.extra' has a weight of shape "
                                                             r"\(\d+, \d+\), with no elements.*exclude_modules"):
        minilora.inject(model, r=4, target_modules=["q_proj", "extra"])
    assert not list(minilora.lora_modules(model))
