"""minilora/quant.py: quantizing a model's base (QLoRA) in NF4 and int8, LoRA over it, merging,
saving, and the training app's --quantize. The weight type itself: tests/test_weight.py."""

import copy
import json
import os

import pytest
import torch
from torch import nn

import minilora
from minilora.quant import QuantEmbedding, QuantizedBaseError, QuantizedWeight, QuantLinear, weight_bytes
from conftest import assert_close_to_rounding, randomize_adapters, run_xla, tiny_llama, train_argv

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_state_dict_holds_the_codes_and_loads_into_a_quantized_model():
    model = minilora.quantize(tiny_llama(), "nf4")
    keys = list(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight.codes" in keys and "lm_head.weight" in keys
    assert not any(k.endswith(("pair_code", "scale_code")) for k in keys)  # code books are constants
    other = minilora.quantize(tiny_llama(seed=5), "nf4")
    other.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 12))
    assert torch.equal(other(ids).logits, model(ids).logits)


def dequantized_base(quantized: nn.Module, **config):
    """A plain tiny Llama (no adapters) holding ``quantized``'s base weights, dequantized."""
    plain = tiny_llama(**config)
    missing, _ = plain.load_state_dict(minilora.dequantize(quantized).state_dict(), strict=False)
    assert not missing
    return plain


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("order", ["quantize-then-inject", "inject-then-quantize"])
def test_lora_over_a_quantized_base_equals_lora_over_its_dequantized_weights(scheme, order):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    if order == "quantize-then-inject":
        minilora.inject(minilora.quantize(model, scheme), r=4, target_modules=["q_proj", "v_proj"])
    else:
        minilora.quantize(minilora.inject(model, r=4, target_modules=["q_proj", "v_proj"]), scheme)
    randomize_adapters(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, QuantizedWeight)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)  # not a LoRA target: quantized all the same
    assert isinstance(model.lm_head, nn.Linear)  # the head stays in full precision
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n in trainable)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in minilora.lora_parameters(model)}

    plain = minilora.dequantize(copy.deepcopy(model))  # LoRA over dense weights: the reference path
    plain.train()
    plain_loss = plain(ids, labels=ids).loss
    plain_loss.backward()
    assert_close_to_rounding(loss, plain_loss, reduction=128 * 2)
    for name, p in minilora.lora_parameters(plain):
        assert_close_to_rounding(p.grad, grads[name], reduction=24 * 128)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = randomize_adapters(minilora.inject(minilora.quantize(tiny_llama(), "nf4"), r=4))
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in minilora.lora_parameters(model)})
    for name, g in grads[0].items():
        assert_close_to_rounding(grads[1][name], g, reduction=24 * 128)


# -- merging and adapters --------------------------------------------------------------------------

def test_merge_refuses_a_quantized_base_and_merge_and_unload_returns_plain_linears():
    ids = torch.randint(3, 128, (2, 12))
    model = randomize_adapters(minilora.inject(minilora.quantize(tiny_llama(), "nf4"), r=4)).to(torch.bfloat16)
    expected = model(ids).logits
    before = model.state_dict()
    with pytest.raises(ValueError, match="merge_and_unload"):
        minilora.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed
    layer = model.model.layers[0].self_attn.q_proj
    dense_then = layer.weight.dequantize().float() + layer.adapters["default"].delta_weight()
    minilora.merge_and_unload(model)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear, minilora.LoRALinear))]
    assert all(type(m) is nn.Linear for m in linears) and len(linears) == 2 * 7 + 1
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.dtype == torch.bfloat16 and not q_proj.requires_grad
    # round(round(dequantized) + delta): within one bf16 rounding of the float32 sum
    assert ((q_proj.float() - dense_then).abs() <= dense_then.abs() * 2 * torch.finfo(torch.bfloat16).eps + 1e-6).all()
    # the merged model computes what the adapter did on the quantized base, up to bf16 rounding
    torch.testing.assert_close(model(ids).logits, expected, atol=0.1, rtol=0.05)


def test_a_qlora_adapter_loads_on_the_plain_base_in_minilora_and_peft(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 128, (2, 12))
    model = minilora.quantize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "nf4")
    randomize_adapters(minilora.inject(model, r=4))
    minilora.save_adapter(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "quant" not in json.dumps(config)
    # on the dequantized base, both libraries reproduce the quantized model's output
    expected = model(ids).logits
    ours = minilora.load_adapter(dequantized_base(minilora.quantize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "nf4")),
                                 str(tmp_path))
    peft = PeftModel.from_pretrained(dequantized_base(minilora.quantize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                                                "nf4")), str(tmp_path))
    assert_close_to_rounding(ours(ids).logits, expected, reduction=128 * 4)
    assert_close_to_rounding(peft(ids).logits, expected, reduction=128 * 4)
    # and on the original float base, the adapter loads as any other
    plain = minilora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(tmp_path))
    assert torch.isfinite(plain(ids).logits).all()


# -- bad input and sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(scheme="fp4"), "not one of nf4, int8"),
    (dict(scheme="nf4", blocksize=48), "blocksize=48"),
    (dict(scheme="nf4", target_modules=["q_proj", "lm_head"]), "shared with model.embed_tokens"),
    (dict(scheme="nf4", embeddings="false"), "embeddings='false': give True or False"),  # it quantized the table
    (dict(scheme="nf4", double_quant="no"), "double_quant='no': give True or False"),
])
def test_bad_settings_raise_and_leave_the_model_as_it_was(kwargs, message):
    model = tiny_llama(tie_word_embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        minilora.quantize(model, **kwargs)
    assert not any(isinstance(m, (QuantLinear, QuantizedWeight)) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_quantizing_twice_is_refused():
    model = minilora.quantize(tiny_llama(), "nf4")
    with pytest.raises(ValueError, match="already quantized"):
        minilora.quantize(model, "int8")


def llama_1b_on_meta():
    """The Llama-3.2-1B shape (the benchmark's "llama-1b", its config.json) in bf16 on the meta device."""
    from transformers import LlamaForCausalLM

    from minilora_bench.models import SHAPES, llama_config

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(SHAPES["llama-1b"])).to(torch.bfloat16)


def test_weight_bytes_of_the_llama_3_2_1b_shape_on_the_meta_device():
    # The Llama-3.2-1B shape (its config.json), quantized with no weights allocated: the buffers'
    # shapes alone give the bytes.
    model = llama_1b_on_meta()
    bf16 = weight_bytes(model)
    assert bf16 == sum(p.numel() for p in model.parameters()) * 2  # the tied head counted once
    minilora.quantize(model, "nf4")
    up = model.model.layers[0].mlp.up_proj.weight  # (8192, 2048): n = 16,777,216
    # n/2 code bytes, n/64 one-byte block scales, 4 bytes per 256 of those, a 4-byte offset
    assert up.nbytes() == 8_388_608 + 262_144 + 4 * 1024 + 4
    layers = minilora.quant.quantized_layers(model)
    assert len(layers) == 16 * 7 and not isinstance(model.lm_head, QuantLinear)
    codes = sum(n // 2 + n // 64 + 4 * -(-n // 64 // 256) + 4 for n in (m.shape.numel() for _, m in layers))
    assert weight_bytes(model) == codes + sum(p.numel() for p in model.parameters()) * 2


# -- the embedding (embeddings=True) ---------------------------------------------------------------

def test_embeddings_true_stores_the_tied_table_once_and_looks_up_rows_only(monkeypatch):
    model = tiny_llama(tie_word_embeddings=True).to(torch.bfloat16)
    table = model.model.embed_tokens.weight
    reference = minilora.quantize(tiny_llama(tie_word_embeddings=True).to(torch.bfloat16), "nf4")
    minilora.quantize(model, "nf4", embeddings=True)
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.weight is embed.weight and embed.weight.dtype == torch.bfloat16  # one copy, the compute dtype kept
    assert torch.equal(embed.weight.codes, QuantizedWeight(table, "nf4").codes)
    # bytes: the table's codes and scales once, where the float model had its bf16 table once
    assert weight_bytes(model) == weight_bytes(reference) - table.numel() * 2 + embed.weight.nbytes()
    assert "lm_head.weight.codes" in model.state_dict()  # both keys, as the float model had
    ids = torch.randint(0, 128, (2, 12))
    expected = dequantized_base(copy.deepcopy(model), tie_word_embeddings=True).to(torch.bfloat16)(ids).logits
    assert_close_to_rounding(model(ids).logits, expected, reduction=64 * 2)
    rows = embed.weight.dequantize()[ids]  # (2, 12, 64)
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda *_: pytest.fail("a lookup dequantized the table"))
    assert torch.equal(embed(ids), rows)


def test_embeddings_true_on_an_untied_model_leaves_the_head_alone_and_dequantize_reties_a_tied_one():
    untied = minilora.quantize(tiny_llama(), "nf4", embeddings=True)
    assert isinstance(untied.model.embed_tokens, QuantEmbedding) and type(untied.lm_head) is nn.Linear
    tied = minilora.dequantize(minilora.quantize(tiny_llama(tie_word_embeddings=True), "int8", embeddings=True))
    assert type(tied.model.embed_tokens) is nn.Embedding and tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.parametrize("tied", [False, True])
def test_lora_on_a_quantized_embedding_trains_saves_and_unloads(tied, tmp_path):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model = minilora.quantize(tiny_llama(tie_word_embeddings=tied), "nf4", embeddings=True)
    randomize_adapters(minilora.inject(model, r=4, target_modules=["q_proj", "embed_tokens"]))
    layer = model.model.embed_tokens
    assert isinstance(layer, minilora.LoRAEmbedding) and layer.quantized
    assert not tied or model.lm_head.weight is layer.weight
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    plain = minilora.dequantize(copy.deepcopy(model))  # the same adapters over the dequantized table
    plain.train()
    plain_loss = plain(ids, labels=ids).loss
    plain_loss.backward()
    assert_close_to_rounding(loss, plain_loss, reduction=128 * 2)
    for (name, p), (_, q) in zip(minilora.lora_parameters(model), minilora.lora_parameters(plain)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close_to_rounding(p.grad, q.grad, reduction=24 * 128)
    minilora.save_adapter(model, str(tmp_path))
    loaded = minilora.load_adapter(dequantized_base(minilora.quantize(tiny_llama(tie_word_embeddings=tied), "nf4",
                                                                      embeddings=True), tie_word_embeddings=tied),
                                   str(tmp_path))
    model.eval()
    expected = model(ids).logits
    assert_close_to_rounding(loaded(ids).logits, expected, reduction=128 * 4)
    with pytest.raises(QuantizedBaseError, match="merge_and_unload"):
        minilora.merge(model)
    if tied:  # merging would change the head too: refused before the table is dequantized
        with pytest.raises(ValueError, match="tied"):
            minilora.merge_and_unload(model)
        assert model.model.embed_tokens.quantized and model.lm_head.weight is model.model.embed_tokens.weight
    else:
        minilora.merge_and_unload(model)
        assert type(model.model.embed_tokens) is nn.Embedding and not minilora.quant.quantized_layers(model)
        assert_close_to_rounding(model(ids).logits, expected, reduction=128 * 4)


def test_quantizing_after_inject_keeps_the_embedding_adapter_and_the_tie():
    model = minilora.inject(tiny_llama(tie_word_embeddings=True), r=4, target_modules=["q_proj", "embed_tokens"])
    minilora.quantize(model, "nf4", embeddings=True)
    assert model.model.embed_tokens.quantized and "default" in model.model.embed_tokens.adapters
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("order", ["quantize-then-inject", "inject-then-quantize"])
def test_modules_to_save_over_a_quantized_table_is_refused_and_changes_nothing(order):
    model = tiny_llama(tie_word_embeddings=True)
    if order == "quantize-then-inject":
        minilora.quantize(model, "nf4", embeddings=True)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(QuantizedBaseError, match="cannot be trained in full"):
            minilora.inject(model, r=4, modules_to_save=["embed_tokens"])
        assert not list(minilora.lora_modules(model))
    else:
        minilora.inject(model, r=4, modules_to_save=["embed_tokens"], ensure_weight_tying=True)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(QuantizedBaseError, match="modules_to_save"):
            minilora.quantize(model, "nf4", embeddings=True)
        assert not minilora.quant.quantized_layers(model)
    assert list(model.state_dict()) == list(before)


@pytest.mark.parametrize("build, kwargs, error, message", [
    (lambda: tiny_llama(), dict(embeddings=True, exclude_modules=["embed_tokens"]), ValueError, "no nn.Embedding"),
    (lambda: tiny_llama(tie_word_embeddings=True), dict(target_modules=["q_proj", "lm_head"]), QuantizedBaseError,
     "embeddings=True"),
    (lambda: _with_max_norm(tiny_llama()), dict(embeddings=True), QuantizedBaseError, "max_norm"),
    # issue 30: an inf spread to every block (double quantization); empty layers failed inside torch.cat
    (lambda: _with_value(tiny_llama(), "model.layers.0.self_attn.q_proj", float("inf")), {}, ValueError,
     "model.layers.0.self_attn.q_proj holds 1 non-finite value"),
    (lambda: _with_value(tiny_llama(), "model.embed_tokens", float("-inf")), dict(embeddings=True), ValueError,
     "model.embed_tokens holds 1 non-finite value"),
    (lambda: _with_empty(tiny_llama(), "lm_head", nn.Linear(64, 0)), dict(target_modules=["q_proj", "lm_head"]),
     minilora.UnsupportedLayerError, "'lm_head' has a weight of shape \\(0, 64\\), with no elements"),
    (lambda: _with_empty(tiny_llama(), "model.embed_tokens", nn.Embedding(0, 64)), dict(embeddings=True), ValueError,
     "model.embed_tokens has a table of shape \\(0, 64\\), with no elements"),
    (lambda: minilora.inject(tiny_llama(), r=4, target_modules=["v_proj"], use_dora=True, adapter_name="d"), {},
     QuantizedBaseError, "v_proj holds the DoRA adapter 'd'"),  # its next forward failed with a TypeError
])
def test_what_cannot_be_quantized_raises_and_changes_nothing(build, kwargs, error, message):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        minilora.quantize(model, "nf4", **kwargs)
    assert not minilora.quant.quantized_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _with_max_norm(model):
    model.model.embed_tokens.max_norm = 1.0
    return model


def _with_value(model, name, value):
    with torch.no_grad():
        model.get_submodule(name).weight[3, 5] = value
    return model


def _with_empty(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
    return model


def test_weight_bytes_of_the_llama_3_2_1b_shape_with_its_embedding_quantized():
    model = llama_1b_on_meta()
    bf16 = weight_bytes(model)
    minilora.quantize(model, "nf4", embeddings=True)
    layers = minilora.quant.quantized_layers(model)
    assert len(layers) == 16 * 7 + 1 and model.lm_head.weight is model.model.embed_tokens.weight
    codes = sum(n // 2 + n // 64 + 4 * -(-n // 64 // 256) + 4 for n in (m.shape.numel() for _, m in layers))
    norms = sum(p.numel() for p in model.parameters()) * 2  # what stays bf16: the RMSNorm weights
    assert weight_bytes(model) == codes + norms and weight_bytes(model) / bf16 < 0.30


# -- the training app: --quantize ------------------------------------------------------------------

def test_quantize_without_an_adapter_is_a_usage_error(tmp_path):
    from minilora_train.config import UsageError, parse_args

    with pytest.raises(UsageError, match="add --use_lora"):
        parse_args([a for a in train_argv("m", "d", tmp_path, "--quantize", "nf4") if a != "--use_lora"])


def test_quantize_embeddings_needs_quantize_and_reaches_the_table(tmp_path, tiny_model_dir, tiny_text_file):
    from minilora_train.config import UsageError, parse_args
    from minilora_train.loop import run
    from transformers import AutoTokenizer

    with pytest.raises(UsageError, match="add --quantize nf4"):
        parse_args(train_argv("m", "d", tmp_path, "--quantize_embeddings"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tied = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # as Llama-3.2-1B and SmolLM2
    args = parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "out", "--quantize", "nf4",
                                 "--quantize_embeddings", "--max_steps", "2", "--general_eval_dataset", "none",
                                 "--max_eval_samples", "4"))
    summary = run(args, model=tied, tokenizer=tokenizer)
    assert isinstance(tied.model.embed_tokens, QuantEmbedding) and summary["updates"] == 2
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # placing the model on its device kept one table


QUANTIZED_SPMD_RUN = """
import json, os, torch, torch_xla
from conftest import train_argv
from minilora.quant import quantized_layers
from minilora_train.config import parse_args
from minilora_train.device import Device
from minilora_train.loop import run
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({model!r})  # ours, so its shards can be read after the run
args = parse_args(train_argv({model!r}, {data!r}, {out!r}, *{flags!r}))
device = Device.start(args)
summary = run(args, model=model, tokenizer=AutoTokenizer.from_pretrained({model!r}), device=device)
layers = quantized_layers(model)  # none in the unquantized run
codes = layers[0][1].codes if layers else torch.zeros(0, device=torch_xla.device())
shards = [list(s.shape) for s, _ in torch_xla._XLAC._get_local_shards([codes])[0]] if layers else []
print(json.dumps({{"xla": summary["xla"], "ways": device.layout.ways, "codes": list(codes.shape),
                   "shards": shards}}))
"""


def test_qlora_under_spmd_with_checkpointing_adds_no_compilation_and_shards_the_codes(tiny_model_dir, tiny_text_file,
                                                                                      tmp_path):
    """The XLA path end to end on 4 CPU devices (FSDPv2): the same losses as an eager CPU run,
    no more compilation after the warm-up updates than the same run without quantization (the
    dequantization traces into the same graphs every step), and each device holding a quarter
    of the codes."""
    from minilora_train.config import parse_args
    from minilora_train.loop import run

    flags = ("--gradient_checkpointing", "--max_steps", "3", "--general_eval_dataset", "none",
             "--max_eval_samples", "4", "--lora_dropout", "0")
    xla = ("--device", "xla", "--spmd", "--per_device_train_batch_size", "2")
    # the token embedding too (untied here): its row gathers trace into the same graphs every step
    quantized = ("--quantize", "nf4", "--quantize_embeddings")
    run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "cpu", *quantized, *flags,
                              "--per_device_train_batch_size", "8")))
    results = {}
    for quantize in (quantized, ()):
        out = tmp_path / ("xla-nf4" if quantize else "xla")
        code = QUANTIZED_SPMD_RUN.format(model=tiny_model_dir, data=tiny_text_file, out=str(out),
                                         flags=[*quantize, *flags, *xla])
        results[bool(quantize)] = run_xla(code, env={"CPU_NUM_DEVICES": "4", "PYTHONPATH": os.path.dirname(
            os.path.abspath(__file__))}, timeout=300)
    quantized, plain = results[True], results[False]
    assert quantized["ways"] == 4
    assert quantized["xla"]["compiles_after_warmup"] == plain["xla"]["compiles_after_warmup"], results
    assert quantized["xla"]["host_fallbacks_after_warmup"] == plain["xla"]["host_fallbacks_after_warmup"], results
    assert quantized["shards"] == [[quantized["codes"][0] // 4]] * 4
    assert train_losses(tmp_path / "xla-nf4") == pytest.approx(train_losses(tmp_path / "cpu"), rel=1e-4)


def train_losses(out) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["train_loss"] for r in map(json.loads, f) if "train_loss" in r]


def test_transformers_save_pretrained_of_a_quantized_base_is_refused_and_writes_nothing(tmp_path, tiny_llama_dir):
    """It wrote the codes, and from_pretrained initialised every quantized Linear at random (issue 30).
    With an adapter it writes the adapter, as after inject; dequantized, the model's own again."""
    from transformers import AutoModelForCausalLM

    model = minilora.quantize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "nf4")
    with pytest.raises(QuantizedBaseError, match="minilora.dequantize\\(model\\) first"):
        model.save_pretrained(tmp_path / "quantized")
    assert not (tmp_path / "quantized").exists()
    minilora.inject(model, r=4, adapter_name="a")
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter" / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    minilora.delete_adapter(model, "a")
    with pytest.raises(QuantizedBaseError):
        model.save_pretrained(tmp_path / "quantized")
    expected = minilora.dequantize(model)(IDS).logits
    model.save_pretrained(tmp_path / "plain")
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")(IDS).logits, expected)


def test_dora_over_a_quantized_base_is_refused_before_anything_changes():
    model = minilora.quantize(tiny_llama(), "nf4")
    with pytest.raises(ValueError, match="DoRA over a quantized base"):
        minilora.inject(model, r=4, use_dora=True)
    assert not any(isinstance(m, minilora.LoRALinear) for m in model.modules())
