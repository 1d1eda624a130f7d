"""train/gguf_base.py: a GGUF file as the frozen base in its own blocks (--quantize gguf)."""

from __future__ import annotations

import json

import pytest
import torch

import minilora
from minilora.gguf_quant import GGUFWeight
from minilora.quant import QuantEmbedding, QuantLinear, weight_bytes
from minilora_train.base_model import BaseModelError, packaged_smollm2
from minilora_train.gguf_base import load_gguf_base, read_header, rope_rows, tensor_bytes

from conftest import train_argv, write_tiny_gguf

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


@pytest.mark.parametrize("ggml_type", TYPES)
def test_the_block_base_computes_transformers_own_gguf_conversion_exactly(ggml_type, tmp_path):
    """transformers' GGUF loader dequantizes every tensor with gguf-py and undoes the q/k row
    permutation; the block base keeps the blocks and must give the very same logits."""
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / f"tiny-{ggml_type}.gguf", ggml_type, tied=ggml_type != "Q4_0")
    model, tokenizer = load_gguf_base(path, cache_root=tmp_path / "cache")
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (ggml_type != "Q4_0")  # tied: one table
    assert weight_bytes(model) == tensor_bytes(read_header(path))  # float32 compute: every byte as the file's
    # the run's "all params" line counts the file's weights, not only the float norms beside them
    assert minilora.count_parameters(model)[1] == minilora.count_parameters(reference)[1]


def test_smollm2_in_its_q4_1_blocks_is_the_converted_model_in_1_0x_the_files_bytes(smollm2):
    cache, _, from_gguf = smollm2
    path = packaged_smollm2()
    model, tokenizer = load_gguf_base(path, cache_root=cache)
    ids = tokenizer("Gout is caused by uric acid crystals in the joints.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, from_gguf(ids).logits)
    file_bytes = tensor_bytes(read_header(path))  # 96,576,768 bytes: Q4_1 Linears, a Q8_0 embedding, F32 norms
    assert weight_bytes(model) <= 1.1 * file_bytes
    model.to(torch.bfloat16)  # what the demo computes in: the norms halve, the blocks stay
    assert weight_bytes(model) <= file_bytes
    assert {w.ggml_type for _, w in minilora.quant.quantized_layers(model)} == {"Q4_1", "Q8_0"}


def test_rope_rows_is_llama_cpps_permutation():
    # convert_hf_to_gguf.py: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    w = torch.arange(12 * 3).view(12, 3)
    permuted = w.reshape(2, 2, 3, 3).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(w[rope_rows(12, 2)], permuted)


def test_an_unsupported_tensor_type_and_architecture_are_named_in_one_line(tmp_path):
    import gguf
    import numpy as np

    path = write_tiny_gguf(tmp_path / "tiny.gguf", "Q8_0", layers=1)
    # the same file with one tensor in Q2_K (random blocks; GGUFWeight does not read Q2_K)
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "q2k.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for tensor in reader.tensors:
        if tensor.name == "blk.0.attn_q.weight":
            writer.add_tensor(tensor.name, np.zeros((256, 84), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(BaseModelError) as error:
        load_gguf_base(tmp_path / "q2k.gguf", cache_root=tmp_path / "cache")
    assert "blk.0.attn_q.weight" in str(error.value) and "Q2_K" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_app_trains_on_the_blocks_and_the_adapter_names_the_file(tmp_path, tiny_text_file, monkeypatch):
    from minilora_train.config import UsageError, parse_args
    from minilora_train.loop import run

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "Q4_K")
    with pytest.raises(UsageError, match="must be a .gguf file"):
        parse_args(train_argv(tmp_path, tiny_text_file, tmp_path / "x", "--quantize", "gguf"))
    args = parse_args(train_argv(path, tiny_text_file, tmp_path / "out", "--quantize", "gguf", "--max_steps", "2",
                                 "--general_eval_dataset", "none", "--max_eval_samples", "4"))
    summary = run(args)
    assert summary["updates"] == 2
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path)
    # the adapter loads back onto the block base of the same file
    model, _ = load_gguf_base(path)
    minilora.load_adapter(model, str(tmp_path / "out"))
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, GGUFWeight)


def test_training_on_the_blocks_follows_training_on_the_float_conversion(tmp_path, tiny_text_file, monkeypatch):
    """The two bases are the same numbers, so the same run gives the same losses (up to float32
    rounding: the block base's head is a quantized Linear, so its loss takes the full logits)."""
    from minilora_train.config import parse_args
    from minilora_train.loop import run

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "Q5_1")
    losses = {}
    for name, flags in (("blocks", ["--quantize", "gguf"]), ("float", ["--no-chunked_loss"])):
        out = tmp_path / name
        run(parse_args(train_argv(path, tiny_text_file, out, *flags, "--max_steps", "3", "--general_eval_dataset",
                                  "none", "--max_eval_samples", "4")))
        with open(out / "metrics.jsonl") as f:
            losses[name] = [r["train_loss"] for r in map(json.loads, f) if "train_loss" in r]
    assert len(losses["blocks"]) == 3
    assert losses["blocks"] == pytest.approx(losses["float"], rel=1e-5)
