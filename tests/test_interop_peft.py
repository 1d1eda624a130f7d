"""Interoperability with PEFT, both directions, on a tiny Llama: an adapter saved by one loads in
the other and gives the same logits. Covers rsLoRA, rank/alpha patterns, all-linear, layer
selection, dropout (off in eval), and trained biases (bias="all" / "lora_only")."""

import pytest
import torch

import minilora
from conftest import tiny_llama
from test_checkpoint import CASES, IDS, trained


def randomize_peft(model, seed=3):
    """What training does to a PEFT model: every trainable tensor (lora_A, lora_B, biases) moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("case", CASES)
def test_minilora_adapter_loads_in_peft_with_the_same_logits(tmp_path, case):
    from peft import PeftModel

    config, model_fields, _ = CASES[case]
    ours = trained(config, model_fields)
    minilora.save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(tiny_llama(**model_fields), tmp_path).eval()
    expected = ours(IDS).logits
    assert not torch.allclose(expected, tiny_llama(**model_fields)(IDS).logits, atol=1e-3)  # the adapter matters
    assert (theirs(IDS).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_minilora_with_the_same_logits(tmp_path, case):
    import peft

    _, model_fields, peft_fields = CASES[case]
    theirs = peft.get_peft_model(tiny_llama(**model_fields), peft.LoraConfig(task_type="CAUSAL_LM", **peft_fields))
    randomize_peft(theirs).save_pretrained(tmp_path)
    theirs.eval()
    ours = minilora.load_adapter(tiny_llama(**model_fields), tmp_path)
    expected = theirs(IDS).logits
    assert not torch.allclose(expected, tiny_llama(**model_fields)(IDS).logits, atol=1e-3)
    assert (ours(IDS).logits - expected).abs().max() <= 1e-5


def test_peft_and_minilora_agree_on_the_scaling_of_every_layer():
    import peft

    _, _, peft_fields = CASES["patterns"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(use_rslora=True, **peft_fields))
    ours = minilora.inject(tiny_llama(), use_rslora=True, **CASES["patterns"][0])
    their_scaling = {n.removeprefix("base_model.model."): m.scaling["default"]
                     for n, m in theirs.named_modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)}
    assert their_scaling == {n: m.scaling for n, m in minilora.lora_modules(ours)}
