"""modules_to_save: a trainable copy per adapter that switches with the adapter, saved and loaded in
PEFT's format both ways (equal logits), tied embeddings, and merge_and_unload keeping the copy."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

import minilora
from conftest import tiny_llama, trained
from minilora import ModuleToSave

IDS = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


# (tiny_llama fields, modules_to_save, ensure_weight_tying)
CASES = {
    "untied_head_and_embeddings": (dict(), ["lm_head", "embed_tokens"], False),
    "tied_pair_kept_tied": (dict(tie_word_embeddings=True), ["lm_head", "embed_tokens"], True),
    "tied_head_alone_untied": (dict(tie_word_embeddings=True), ["lm_head"], False),
    "tied_head_named_kept_tied": (dict(tie_word_embeddings=True), ["lm_head"], True),
}


@pytest.mark.parametrize("case", CASES)
def test_minilora_copies_load_in_peft_with_the_same_logits(tmp_path, case):
    from peft import PeftModel

    fields, names, tying = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untied case warns (tested below)
        ours = trained(minilora.inject(tiny_llama(**fields), modules_to_save=names, ensure_weight_tying=tying, **LORA))
    minilora.save_adapter(ours, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.lm_head.weight" in keys  # PEFT's key: the module's own, no adapter name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(tiny_llama(**fields), tmp_path).eval()
    expected = ours(IDS).logits
    assert (theirs(IDS).logits - expected).abs().max() <= 1e-5
    assert not torch.allclose(tiny_llama(**fields)(IDS).logits, expected, atol=1e-3)


@pytest.mark.parametrize("case", CASES)
def test_peft_copies_load_in_minilora_with_the_same_logits(tmp_path, case):
    import peft

    fields, names, tying = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(**fields), peft.LoraConfig(
            modules_to_save=names, ensure_weight_tying=tying, task_type="CAUSAL_LM", **LORA))
    trained(theirs).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minilora.load_adapter(tiny_llama(**fields), tmp_path)
    assert (ours(IDS).logits - theirs.eval()(IDS).logits).abs().max() <= 1e-5


def test_copies_switch_with_the_adapter_and_the_original_stays_frozen():
    model = minilora.inject(tiny_llama(), modules_to_save=["lm_head"], adapter_name="a", **LORA)
    minilora.inject(model, adapter_name="b", **LORA)  # no copy: lm_head is the base's for b
    trained(model)
    base = tiny_llama()
    head = model.lm_head
    assert isinstance(head, ModuleToSave) and torch.equal(head.weight, base.lm_head.weight)
    assert sorted(model.state_dict()).count("lm_head.weight") == 1  # base keys unchanged
    assert head.in_features == 64 and head.out_features == 128  # the module's attributes read through
    minilora.set_adapter(model, "a")
    a = model(IDS).logits
    minilora.set_adapter(model, "b")
    b = model(IDS).logits
    assert not torch.allclose(a, b, atol=1e-3)
    hidden = model.model(IDS).last_hidden_state
    assert torch.equal(head(hidden), base.lm_head(hidden))  # b has no copy: the original runs
    with minilora.mixed_batch(model, ["a", None, "b"]):
        mixed = model(IDS).logits
    with minilora.disable_adapters(model):
        plain = model(IDS).logits
    torch.testing.assert_close(mixed[0], a[0])
    torch.testing.assert_close(mixed[1], plain[1])
    torch.testing.assert_close(mixed[2], b[2])
    torch.testing.assert_close(plain, base(IDS).logits)
    minilora.delete_adapter(model, "a")
    assert list(head.adapters) == []


def test_only_the_copy_trains_and_the_optimizer_gets_it_once():
    model = minilora.inject(tiny_llama(tie_word_embeddings=True), modules_to_save=["lm_head", "embed_tokens"],
                            ensure_weight_tying=True, **LORA)
    params = dict(minilora.lora_parameters(model))
    copies = [n for n in params if "lm_head" in n or "embed_tokens" in n]
    assert len(copies) == 1  # one matrix, shared by both copies as by both originals
    assert model.lm_head.adapters["default"].weight is model.model.embed_tokens.adapters["default"].weight
    original = model.lm_head.weight.detach().clone()
    opt = torch.optim.SGD(params.values(), lr=0.1)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    assert torch.equal(model.lm_head.weight, original)
    assert not torch.equal(model.lm_head.adapters["default"].weight, original)


def test_naming_one_of_a_tied_pair_warns_that_the_copy_unties_it():
    with pytest.warns(UserWarning, match="no longer tied.*ensure_weight_tying=True"):
        minilora.inject(tiny_llama(tie_word_embeddings=True), modules_to_save=["lm_head"], **LORA)


@pytest.mark.parametrize("case", ["untied_head_and_embeddings", "tied_head_alone_untied"])
def test_merge_and_unload_keeps_the_trained_copy_through_transformers_save(tmp_path, case):
    from transformers import LlamaForCausalLM

    fields, names, tying = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = trained(minilora.inject(tiny_llama(**fields), modules_to_save=names, ensure_weight_tying=tying, **LORA))
    expected = model(IDS).logits
    merged = minilora.merge_and_unload(model)
    assert type(merged.lm_head) is torch.nn.Linear
    assert (merged(IDS).logits - expected).abs().max() <= 1e-5
    merged.save_pretrained(tmp_path)  # a tied config would drop the trained head: it says untied now
    assert (LlamaForCausalLM.from_pretrained(tmp_path)(IDS).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("fields, words", [
    (dict(modules_to_save=["head"]), "no module matched modules_to_save=\\['head'\\].*lm_head"),
    (dict(modules_to_save=["q_proj", "v_proj"]), "no module matched .* outside modules_to_save"),
])
def test_bad_modules_to_save_raise_and_leave_the_model_as_it_was(fields, words):
    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=words):
        minilora.inject(model, **LORA, **fields)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_a_failed_load_puts_the_original_modules_back(tmp_path):
    from safetensors.torch import save_file

    minilora.save_adapter(trained(minilora.inject(tiny_llama(), modules_to_save=["lm_head"], **LORA)), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    del state["base_model.model.lm_head.weight"]
    save_file(state, weights)
    model = tiny_llama()
    head, q_proj = model.lm_head, model.model.layers[0].self_attn.q_proj
    with pytest.raises(minilora.AdapterLoadError, match="missing from file: base_model.model.lm_head.weight"):
        minilora.load_adapter(model, tmp_path)
    assert model.lm_head is head and model.model.layers[0].self_attn.q_proj is q_proj
    assert "save_pretrained" not in model.__dict__ and not minilora.adapter_names(model)


def test_a_tied_partner_that_already_carries_lora_is_refused_with_ensure_weight_tying():
    model = minilora.inject(tiny_llama(tie_word_embeddings=True), r=4, target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="model.embed_tokens.*LoRA target.*through its tied weights"):
        minilora.inject(model, adapter_name="b", modules_to_save=["lm_head"], ensure_weight_tying=True, **LORA)
    assert type(model.lm_head) is torch.nn.Linear


def test_new_tokens_train_in_the_copies_and_an_unresized_base_is_told_to_resize(tmp_path):
    model = tiny_llama()
    model.resize_token_embeddings(130)  # say two chat-template tokens were added before training
    minilora.save_adapter(trained(minilora.inject(model, modules_to_save=["lm_head", "embed_tokens"], **LORA)),
                          tmp_path)
    with pytest.raises(minilora.AdapterLoadError, match=r"has 130 tokens and this model's 128.*resize_token_embed"):
        minilora.load_adapter(tiny_llama(), tmp_path)
    fresh = tiny_llama()
    fresh.resize_token_embeddings(130)
    ids = torch.tensor([[5, 129, 128, 7]])  # the new tokens' rows come from the trained copies
    assert torch.equal(minilora.load_adapter(fresh, tmp_path)(ids).logits, model(ids).logits)


def test_a_module_in_modules_to_save_is_trained_in_full_and_not_also_given_lora():
    # PEFT's rule: modules_to_save wins over target_modules (so PEFT's files for it load here)
    model = minilora.inject(tiny_llama(), r=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["embed_tokens"])
    assert isinstance(model.model.embed_tokens, ModuleToSave)
    assert [n for n, _ in minilora.lora_modules(model)] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]


def test_a_peft_adapter_naming_a_module_in_both_lists_loads_with_the_same_logits(tmp_path):
    import peft

    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["embed_tokens"], task_type="CAUSAL_LM"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained(theirs).save_pretrained(tmp_path)
    ours = minilora.load_adapter(tiny_llama(), tmp_path)
    assert (ours(IDS).logits - theirs.eval()(IDS).logits).abs().max() <= 1e-5
