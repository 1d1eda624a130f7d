"""Writing adapters (minilora/save.py): the files are what PEFT writes for the same config, and
``model.save_pretrained(dir)`` after ``minilora.inject`` writes the adapter as PEFT's
PeftModel.save_pretrained does, so the line a PEFT user writes loses nothing; merge_and_unload
gives the model its own save_pretrained back."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import minilora
from conftest import randomize_adapters, tiny_llama
from test_checkpoint import CASES

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", CASES)
def test_saved_files_are_what_peft_writes_for_the_same_config(tmp_path, case):
    import peft

    ours_config, model_fields, peft_fields = CASES[case]
    minilora.save_adapter(minilora.inject(tiny_llama(**model_fields), **ours_config), tmp_path / "ours")
    peft.get_peft_model(tiny_llama(**model_fields), peft.LoraConfig(task_type="CAUSAL_LM", **peft_fields)) \
        .save_pretrained(tmp_path / "peft")

    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert sorted(ours) == sorted(theirs)
    assert {k: (t.shape, t.dtype) for k, t in ours.items()} == {k: (t.shape, t.dtype) for k, t in theirs.items()}
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what PEFT (and transformers) write

    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    assert set(ours) <= set(theirs)  # every field we write is a PEFT field; PEFT adds ones we leave at default
    # target_modules: PEFT writes a set (order varies) and resolves all-linear to names before applying
    # exclude_modules; what matters is that both files select the same modules.
    selected = [sorted(n for n, _ in minilora.find_targets(tiny_llama(**model_fields),
                                                           minilora.read_adapter_config(tmp_path / d)[0]))
                for d in ("ours", "peft")]
    assert selected[0] == selected[1]
    assert {k: v for k, v in ours.items() if k != "target_modules"} == \
           {k: theirs[k] for k in ours if k != "target_modules"}


def test_lora_state_dict_uses_peft_names_and_holds_the_live_parameters():
    model = minilora.inject(tiny_llama(), r=4, target_modules=["q_proj"])
    state = minilora.lora_state_dict(model)
    assert sorted(state) == [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight"
                             for i in (0, 1) for ab in "AB"]
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] is \
        model.model.layers[0].self_attn.q_proj.lora_A


def adapted(**fields):
    model = minilora.inject(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **fields)
    return randomize_adapters(model)


def test_save_pretrained_writes_the_adapter_that_minilora_and_peft_reload(tmp_path):
    from peft import PeftModel

    model = adapted()
    expected = model(IDS).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    ours = minilora.load_adapter(tiny_llama(), tmp_path)
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(ours(IDS).logits, expected)
    assert (theirs(IDS).logits - expected).abs().max() <= 1e-5
    assert not torch.allclose(tiny_llama()(IDS).logits, expected, atol=1e-3)  # the adapter matters


def test_transformers_from_pretrained_of_the_folder_restores_base_and_adapter(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = minilora.inject(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), r=4, target_modules=["q_proj"])
    randomize_adapters(model).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_llama_dir
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers' PEFT integration reads the folder
    assert (reloaded(IDS).logits - model(IDS).logits).abs().max() <= 1e-5


def test_other_adapters_go_into_subfolders_as_peft_puts_them(tmp_path):
    model = adapted()
    minilora.inject(model, r=2, target_modules=["k_proj"], adapter_name="oncology")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "oncology" / "adapter_config.json").read_text())["target_modules"] == ["k_proj"]
    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["oncology"])
    assert sorted(os.listdir(only)) == ["oncology"]


def test_options_it_cannot_honour_are_refused_and_nothing_is_written(tmp_path):
    model = adapted()
    with pytest.raises(ValueError, match="pickle"):
        model.save_pretrained(tmp_path / "a", safe_serialization=False)
    with pytest.raises(TypeError, match="push_to_hub.*merge_and_unload"):
        model.save_pretrained(tmp_path / "b", push_to_hub=True)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.save_pretrained(tmp_path / "c", selected_adapters=["nope"])
    assert not any((tmp_path / d).exists() for d in "abc")


def test_merge_and_unload_gives_back_transformers_own_save_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    model = adapted()
    assert "save_pretrained" in model.__dict__  # per instance: the class is untouched
    assert "save_pretrained" not in tiny_llama().__dict__
    merged = minilora.merge_and_unload(model)
    assert "save_pretrained" not in merged.__dict__
    merged.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and not (tmp_path / "adapter_config.json").exists()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (reloaded(IDS).logits - merged(IDS).logits).abs().max() <= 1e-5


def test_with_every_adapter_deleted_save_pretrained_saves_the_base_model(tmp_path):
    model = adapted()
    minilora.delete_adapter(model, "default")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()


def test_a_state_dict_passed_in_is_where_the_adapter_tensors_come_from(tmp_path):
    # transformers' Trainer saves with model.save_pretrained(dir, state_dict=..., is_main_process=...),
    # the state dict gathered from FSDP/DeepSpeed shards; PEFT takes the adapter from it, so does minilora.
    model = adapted(modules_to_save=["lm_head"])
    full = {k: v + 1 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=full, is_main_process=True)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    q_a = "model.layers.0.self_attn.q_proj.adapters.default.lora_A"
    assert torch.equal(saved[f"base_model.model.{q_a.replace('.adapters.default.lora_A', '.lora_A.weight')}"], full[q_a])
    assert torch.equal(saved["base_model.model.lm_head.weight"], full["lm_head.adapters.default.weight"])
    with pytest.raises(ValueError, match="no entry for base_model.model.model.layers.0.self_attn.q_proj.lora_A"):
        model.save_pretrained(tmp_path / "x", state_dict={"model.norm.weight": full["model.norm.weight"]})



def test_a_second_save_into_the_folder_during_a_save_loses_neither(tmp_path, monkeypatch):
    """Two processes saving into one folder at once: both wrote "adapter_model.safetensors.tmp", and
    one renamed the other's file away (13 of 240 saves died with FileNotFoundError, issue 30). Here
    the second save runs inside the first one's write, deterministically. Each file's temporary
    name is its own now; the folder holds a complete pair from the save that finished last."""
    import minilora.save as save

    first, second = adapted(), randomize_adapters(adapted(), seed=2)
    write = save.save_file
    interleaved = []

    def write_then_let_the_other_save(state, path, **kwargs):
        write(state, path, **kwargs)
        if not interleaved:
            interleaved.append(path)
            minilora.save_adapter(second, tmp_path)

    monkeypatch.setattr(save, "save_file", write_then_let_the_other_save)
    minilora.save_adapter(first, tmp_path)
    assert interleaved and sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert torch.equal(minilora.load_adapter(tiny_llama(), tmp_path)(IDS).logits, first(IDS).logits)


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import minilora.save as save

    def full_disk(state, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        minilora.save_adapter(adapted(), tmp_path)
    assert os.listdir(tmp_path) == []
