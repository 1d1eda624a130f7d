"""merge / unmerge / merge_and_unload: merged and unmerged compute the same thing, unmerge gives
W0 back (exactly up to one rounding), merging is idempotent and safe, and a merged export is an
ordinary transformers checkpoint."""

import pytest
import torch
from torch import nn

import minilora
from conftest import randomize_adapters, tiny_llama
from minilora import LoRALinear

# (in_features, out_features, r): square, wide, tall, rank 1, and a rank near the width
SHAPES = [(64, 64, 4), (48, 80, 2), (256, 128, 8), (96, 512, 32), (40, 24, 1), (128, 64, 48)]


def layer_with_trained_b(in_features, out_features, r, dtype=torch.float32, seed=0, alpha=None):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, out_features, dtype=dtype))
    layer.weight.requires_grad_(False)
    layer.add_adapter("default", r, alpha or 2 * r)
    layer.active_adapter = "default"
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)  # a B as training leaves it: non-zero, small
    return layer


@pytest.mark.parametrize("in_features, out_features, r", SHAPES)
def test_merged_and_unmerged_agree_in_float32(in_features, out_features, r):
    layer = layer_with_trained_b(in_features, out_features, r)
    x = torch.randn(3, 7, in_features)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    assert layer.merged
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    assert (unmerged - base).abs().max() > 1e-2 * unmerged.abs().max()  # the adapter does matter here


@pytest.mark.parametrize("in_features, out_features, r", SHAPES)
def test_merge_then_unmerge_restores_w0_in_float32(in_features, out_features, r):
    layer = layer_with_trained_b(in_features, out_features, r)
    w0 = layer.weight.clone()
    layer.merge()
    assert not torch.equal(layer.weight, w0)
    layer.unmerge()
    assert not layer.merged
    assert (layer.weight - w0).abs().max() <= 1e-6


# The bf16 bound, stated in docs/library.md. merge rounds W0 + ΔW to bf16 once (error e, at most half
# a bf16 ulp of W0 + ΔW); unmerge computes W1 - ΔW = W0 + e in float32 and rounds again, and since W0
# is itself a bf16 number the nearest one is at most |e| away from W0 + e. So each element moves by
# at most 2|e| <= one ulp of |W0 + ΔW| <= 2^-7 * |W0 + ΔW| (bf16 keeps 8 significant bits).
@pytest.mark.parametrize("in_features, out_features, r", SHAPES)
def test_bf16_merge_unmerge_drift_is_at_most_one_ulp_of_the_merged_weight(in_features, out_features, r):
    layer = layer_with_trained_b(in_features, out_features, r, dtype=torch.bfloat16)
    w0 = layer.weight.float().clone()
    merged = w0 + layer.adapters["default"].delta_weight()
    layer.merge()
    layer.unmerge()
    drift = (layer.weight.float() - w0).abs()
    assert (drift <= 2 ** -7 * merged.abs() * (1 + 2 ** -10)).all()  # 2^-10: float32 arithmetic slack
    # Measured on these shapes: 5-15 % of elements move, each by one bf16 ulp; most return exactly.
    assert (drift > 0).float().mean() < 0.3


@pytest.mark.parametrize("in_features, out_features, r", SHAPES)
def test_bf16_merged_output_stays_within_the_stated_bound(in_features, out_features, r):
    layer = layer_with_trained_b(in_features, out_features, r, dtype=torch.bfloat16)
    x = torch.randn(16, in_features, dtype=torch.bfloat16)
    unmerged = layer(x).float()
    layer.merge()
    merged = layer(x).float()
    # Empirical bound (docs/library.md): merged vs unmerged differ by at most 2^-6 of the output's
    # scale (measured up to 0.0075); either path alone is about 0.005 away from a float32 reference.
    assert (merged - unmerged).abs().max() <= 2 ** -6 * unmerged.abs().max()


def test_merging_twice_is_a_no_op_and_so_is_unmerging_twice():
    layer = layer_with_trained_b(64, 32, 4)
    w0 = layer.weight.clone()
    layer.merge()
    once = layer.weight.clone()
    layer.merge()
    assert torch.equal(layer.weight, once)
    layer.unmerge()
    restored = layer.weight.clone()
    layer.unmerge()
    assert torch.equal(layer.weight, restored) and (restored - w0).abs().max() <= 1e-6

    model = randomize_adapters(minilora.inject(tiny_llama(), r=4))
    ids = torch.randint(3, 128, (1, 8))
    once = minilora.merge(model)(ids).logits
    assert torch.equal(minilora.merge(model)(ids).logits, once)


def test_safe_merge_with_an_inf_raises_and_leaves_the_weight_untouched():
    layer = layer_with_trained_b(32, 16, 4)
    with torch.no_grad():
        layer.lora_B[3, 1] = float("inf")
    w0 = layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite.*left unmerged"):
        layer.merge(safe=True)
    assert torch.equal(layer.weight, w0) and not layer.merged


def test_safe_model_merge_checks_every_layer_before_changing_any():
    model = randomize_adapters(minilora.inject(tiny_llama(), r=4))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_B[0, 0] = float("nan")  # the last adapted layer
    before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    with pytest.raises(ValueError, match="non-finite.*nothing was merged"):
        minilora.merge(model, safe=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert not any(m.merged for _, m in minilora.lora_modules(model))


def test_model_merge_keeps_the_logits_and_unmerge_brings_back_the_base():
    ids = torch.randint(3, 128, (2, 10))
    base_weights = {n: p.clone() for n, p in tiny_llama().named_parameters()}
    model = randomize_adapters(minilora.inject(tiny_llama(), r=4))
    unmerged = model(ids).logits
    merged = minilora.merge(model)(ids).logits
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    minilora.unmerge(model)
    state = model.state_dict()
    assert all((state[n] - w).abs().max() <= 1e-6 for n, w in base_weights.items())


def test_a_merged_model_refuses_adapter_switching_and_disabling():
    model = minilora.inject(tiny_llama(), adapter_name="a")
    minilora.inject(model, adapter_name="b")
    minilora.merge(model)
    with pytest.raises(ValueError, match="'b' is merged.*unmerge"):
        minilora.set_adapter(model, "a")
    with pytest.raises(ValueError, match="merged.*unmerge"):
        minilora.disable_adapters(model)


def test_merge_and_unload_gives_plain_linears_and_an_ordinary_checkpoint(tmp_path):
    from transformers import LlamaForCausalLM

    ids = torch.randint(3, 128, (2, 10))
    base_keys = set(tiny_llama().state_dict())
    model = randomize_adapters(minilora.inject(tiny_llama(), r=4))
    expected = model(ids).logits
    minilora.merge_and_unload(model)
    assert not list(minilora.lora_modules(model))
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert not any(m.training for m in model.modules())  # still in the eval mode it had
    merged = model(ids).logits
    assert (merged - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert set(model.state_dict()) == base_keys

    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, merged)


# -- issue 18: what merge must refuse or handle ----------------------------------------------------

def test_safe_merge_catches_an_fp16_overflow_that_float32_would_not_show():
    """The check runs in the weight's dtype: 65000 + 1000 is finite in float32 but inf in fp16."""
    layer = layer_with_trained_b(8, 8, 2, dtype=torch.float16)
    with torch.no_grad():
        layer.weight.fill_(65000.0)
        layer.adapters["default"].lora_A.fill_(1.0)
        layer.adapters["default"].lora_B.fill_(1000.0)  # delta = (rank 2 x 1000 x 1) x scaling 2 = 4000
    assert torch.isfinite(layer.weight.float() + layer.adapters["default"].delta_weight()).all()
    w0 = layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe=True)
    assert torch.equal(layer.weight, w0)
    model = nn.Sequential()
    model.add_module("proj", layer)
    with pytest.raises(ValueError, match="non-finite weights in torch.float16; nothing was merged"):
        minilora.merge(model, safe=True)
    assert torch.equal(layer.weight, w0) and not layer.merged


def test_merge_inside_disable_adapters_or_a_mixed_batch_is_refused():
    ids = torch.randint(3, 128, (2, 10))
    model = randomize_adapters(minilora.inject(tiny_llama(), r=4))
    with minilora.disable_adapters(model):
        base = model(ids).logits
        with pytest.raises(ValueError, match="adapters are disabled here.*Merge after the block"):
            minilora.merge(model)
        assert torch.equal(model(ids).logits, base)  # still the base model inside the block
    with minilora.mixed_batch(model, ["default", None]):
        with pytest.raises(ValueError, match="a mixed batch is active"):
            minilora.merge(model)
    assert not any(m.merged for _, m in minilora.lora_modules(model))


def test_merging_a_head_tied_to_the_embeddings_unties_it_and_survives_save_and_reload(tmp_path):
    from transformers import LlamaForCausalLM

    ids = torch.randint(3, 128, (2, 10))
    model = tiny_llama(tie_word_embeddings=True)
    embeddings = model.model.embed_tokens.weight
    assert model.lm_head.weight is embeddings
    original = embeddings.clone()
    randomize_adapters(minilora.inject(model, r=4, target_modules=["q_proj", "lm_head"]))
    unmerged = model(ids).logits

    minilora.merge(model)
    assert torch.equal(model.model.embed_tokens.weight, original)  # the input embeddings are not rewritten
    assert (model(ids).logits - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    minilora.unmerge(model)  # the tie comes back, exactly
    assert model.lm_head.weight is embeddings and torch.equal(embeddings, original)
    assert model.config.tie_word_embeddings

    minilora.merge_and_unload(model)
    merged = model(ids).logits
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, merged)
    assert torch.equal(reloaded.model.embed_tokens.weight, original)
