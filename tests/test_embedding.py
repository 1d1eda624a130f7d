"""LoRA on nn.Embedding (minilora/embedding.py): PEFT's lora_embedding_A/B layout and arithmetic,
interoperable with PEFT both ways, merge/unmerge, mixed batches, and the cases it refuses."""

import pytest
import torch
from safetensors.torch import load_file

import minilora
from conftest import tiny_llama, trained
from minilora import LoRAEmbedding

IDS = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])


def test_the_adapter_term_is_peft_embedding_formula_and_starts_at_zero():
    base = torch.nn.Embedding(10, 6, padding_idx=0)
    layer = LoRAEmbedding(base)
    adapter = layer.add_adapter("default", r=3, alpha=6)
    layer.active_adapter = "default"
    ids = torch.tensor([[0, 3, 9], [4, 4, 1]])
    assert adapter.lora_A.shape == (3, 10) and adapter.lora_B.shape == (6, 3)  # PEFT's (r, vocab), (dim, r)
    assert torch.equal(layer(ids), base(ids))  # A starts at zero
    with torch.no_grad():
        adapter.lora_A.normal_()
    expected = base(ids) + torch.nn.functional.embedding(ids, adapter.lora_A.T) @ adapter.lora_B.T * 2.0
    torch.testing.assert_close(layer(ids), expected)


def test_minilora_embedding_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel

    ours = trained(minilora.inject(tiny_llama(), **LORA))
    minilora.save_adapter(ours, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 128)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, 4)
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    expected = ours(IDS).logits
    assert (theirs(IDS).logits - expected).abs().max() <= 1e-5
    assert not torch.allclose(tiny_llama()(IDS).logits, expected, atol=1e-3)


def test_peft_embedding_adapter_loads_in_minilora_with_the_same_logits(tmp_path):
    import peft

    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        trained(theirs).save_pretrained(tmp_path)  # PEFT also writes the base embedding (base_layer.weight)
    ours = minilora.load_adapter(tiny_llama(), tmp_path)
    assert isinstance(ours.model.embed_tokens, LoRAEmbedding)
    assert (ours(IDS).logits - theirs.eval()(IDS).logits).abs().max() <= 1e-5


def test_merge_unmerge_and_unload_give_the_adapted_outputs():
    model = trained(minilora.inject(tiny_llama(), **LORA))
    expected = model(IDS).logits
    minilora.merge(model)
    assert (model(IDS).logits - expected).abs().max() <= 1e-5
    minilora.unmerge(model)
    torch.testing.assert_close(model.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight,
                               rtol=0, atol=1e-6)
    minilora.merge_and_unload(model)
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert (model(IDS).logits - expected).abs().max() <= 1e-5


def test_mixed_batch_and_disable_cover_the_embedding_adapter():
    model = trained(minilora.inject(tiny_llama(), **LORA))
    adapted = model(IDS).logits
    with minilora.disable_adapters(model):
        plain = model(IDS).logits
    with minilora.mixed_batch(model, [None, "default", None]):
        mixed = model(IDS).logits
    torch.testing.assert_close(plain, tiny_llama()(IDS).logits)
    torch.testing.assert_close(mixed[1], adapted[1])
    torch.testing.assert_close(mixed[[0, 2]], plain[[0, 2]])


def test_gradients_reach_both_embedding_factors():
    model = minilora.inject(tiny_llama(), **LORA)
    model(IDS, labels=IDS).loss.backward()
    adapter = model.model.embed_tokens.adapters["default"]
    assert adapter.lora_A.grad.abs().sum() > 0  # B ~ N(0, 1) at init, so A gets a gradient at once
    assert model.model.embed_tokens.weight.grad is None


def test_merging_into_a_tied_embedding_is_refused_because_the_head_would_change():
    model = trained(minilora.inject(tiny_llama(tie_word_embeddings=True), **LORA))
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match="tied.*output head"):
        minilora.merge_and_unload(model)
    assert torch.equal(model.model.embed_tokens.weight, before)


def test_an_embedding_subclass_is_refused_at_inject():
    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    model = tiny_llama()
    model.model.embed_tokens = ScaledEmbedding(128, 64)
    with pytest.raises(ValueError, match="ScaledEmbedding.*plain nn.Embedding only"):
        minilora.inject(model, **LORA)
    assert not minilora.adapter_names(model)
