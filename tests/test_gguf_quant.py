"""minilora/gguf_quant.py: GGUF's block formats as a frozen base weight, dequantized in plain torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import minilora
from minilora.gguf_quant import BLOCK_LAYOUTS, FLOAT_TYPES, GGML_TYPES, GGUFWeight, UnsupportedGGMLTypeError
from minilora.quant import QuantLinear

from conftest import assert_close_to_rounding, run_xla


def random_rows(ggml_type: str, rows: int, blocks: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """(rows, bytes per row) uint8 of random blocks of ``ggml_type`` and the row's value count:
    random bytes for the codes, random finite float16 values for the scales (random bits would
    hold NaNs, which compare unequal to themselves)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    if ggml_type in FLOAT_TYPES:
        values = rng.standard_normal((rows, blocks * 32)).astype(np.float32)
        if ggml_type == "F16":
            values = values.astype(np.float16)
        elif ggml_type == "BF16":
            values = (values.view(np.uint32) >> 16).astype(np.uint16)
        return values.view(np.uint8), blocks * 32
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    start = 0
    for name, nbytes in BLOCK_LAYOUTS[ggml_type][2]:
        if name != "codes":
            raw[..., start:start + 2] = rng.standard_normal((rows, blocks, 1)).astype(np.float16).view(np.uint8)
        start += nbytes
    return raw.reshape(rows, -1), blocks * block


@pytest.mark.parametrize("ggml_type", GGML_TYPES)
def test_every_type_dequantizes_to_gguf_pys_reference_bit_for_bit(ggml_type):
    raw, in_features = random_rows(ggml_type, rows=7, blocks=3)
    # gguf-py's own reader hands F16 tensors over as float16 and BF16 ones as raw bytes
    reference = gguf_dequantize(raw.view(np.float16) if ggml_type == "F16" else raw, GGMLQuantizationType[ggml_type])
    weight = GGUFWeight(torch.from_numpy(raw.copy()), ggml_type, in_features)
    got = weight.dequantize(torch.float32)
    assert got.shape == (7, in_features) == reference.shape
    assert np.array_equal(got.numpy().view(np.uint32), reference.reshape(7, -1).view(np.uint32))
    assert weight.nbytes() == raw.nbytes  # the file's bytes, split into scales and codes, nothing more
    # a tile of rows and an embedding lookup read only their rows' blocks, and give the same bits
    assert torch.equal(weight.dequantize_rows(slice(2, 5), torch.float32), got[2:5])
    assert torch.equal(weight.dequantize_rows(torch.tensor([6, 0, 6]), torch.float32), got[[6, 0, 6]])
    # the compute dtype: float32 rounded once
    assert torch.equal(weight.dequantize(torch.bfloat16), got.to(torch.bfloat16))


def test_an_unsupported_type_is_named_in_one_line():
    with pytest.raises(UnsupportedGGMLTypeError) as error:
        GGUFWeight(torch.zeros(2, 136, dtype=torch.uint8), "IQ4_XS", 256)
    message = str(error.value)
    assert "IQ4_XS" in message and "Q4_K" in message and "\n" not in message


def test_rows_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match="a row"):
        GGUFWeight(torch.zeros(2, 19, dtype=torch.uint8), "Q4_1", 32)
    with pytest.raises(ValueError, match="multiple"):
        GGUFWeight(torch.zeros(2, 20, dtype=torch.uint8), "Q4_1", 48)


def q4k_linear(out=8, blocks=1, seed=0) -> QuantLinear:
    raw, in_features = random_rows("Q4_K", out, blocks, seed)
    weight = GGUFWeight(torch.from_numpy(raw.copy()), "Q4_K", in_features)
    # random scales make values of order 1e3; scale them to a weight's size through d and m
    weight.d.mul_(1e-4), weight.m.mul_(1e-4)
    return QuantLinear(weight)


def test_lora_over_a_gguf_weight_trains_like_lora_over_its_dequantized_weight():
    torch.manual_seed(0)
    model = torch.nn.Sequential(q4k_linear())
    dense = torch.nn.Sequential(model[0].to_linear())
    for m in (model, dense):
        minilora.inject(m, r=4, target_modules=["0"])
    dense.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for (_, a), (_, b) in zip(minilora.lora_parameters(model), minilora.lora_parameters(dense)):
            a.normal_(), b.copy_(a)
    x = torch.randn(5, 256)
    out, expected = model(x), dense(x)
    assert_close_to_rounding(out, expected, reduction=256)
    out.square().sum().backward(), expected.square().sum().backward()
    for (name, a), (_, b) in zip(minilora.lora_parameters(model), minilora.lora_parameters(dense)):
        assert_close_to_rounding(a.grad, b.grad, reduction=256 * 5)
    # the state dict holds the file's scales and codes, under the Linear's weight
    keys = set(model.state_dict())
    assert {"0.weight.codes", "0.weight.d", "0.weight.m"} <= keys


def test_a_dtype_conversion_changes_the_compute_dtype_and_never_the_blocks():
    linear = q4k_linear()
    codes, d = linear.weight.codes.clone(), linear.weight.d.clone()
    linear.to(torch.bfloat16)
    assert linear.weight.dtype == torch.bfloat16 and linear.weight.d.dtype == torch.float16
    assert torch.equal(linear.weight.codes, codes) and torch.equal(linear.weight.d, d)
    assert linear(torch.randn(3, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_merging_into_a_gguf_base_is_refused_and_merge_and_unload_gives_a_plain_linear():
    model = torch.nn.Sequential(q4k_linear())
    minilora.inject(model, r=4, target_modules=["0"])
    with pytest.raises(minilora.quant.QuantizedBaseError, match="quantized base"):
        minilora.merge(model)
    x = torch.randn(3, 256)
    expected = model(x)
    minilora.merge_and_unload(model)
    assert type(model[0]) is torch.nn.Linear
    assert_close_to_rounding(model(x), expected, reduction=256)


GGUF_ON_XLA = """
import json, sys, numpy as np, torch, torch_xla
sys.path.insert(0, {tests!r})
import minilora
from minilora.gguf_quant import GGUFWeight
from minilora.quant import QuantLinear
from test_gguf_quant import random_rows

device, out = torch_xla.device(), {{}}
for ggml_type in {types!r}:
    raw, in_features = random_rows(ggml_type, rows=6, blocks=2)
    model = torch.nn.Sequential(QuantLinear(GGUFWeight(torch.from_numpy(raw.copy()), ggml_type, in_features)))
    minilora.inject(model, r=2, target_modules=["0"])
    with torch.no_grad():
        model[0].adapters["default"].lora_B.normal_()
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0))
    lazy = model.to(device)[0]  # its blocks and adapter moved
    weight = lazy.weight.dequantize(torch.float32).cpu()
    reference = GGUFWeight(torch.from_numpy(raw.copy()), ggml_type, in_features).dequantize(torch.float32)
    y = lazy(x.to(device))
    y.square().sum().backward()
    out[ggml_type] = {{"weight": (weight - reference).abs().max().item() / reference.abs().max().item(),
                      "dtype": str(lazy.weight.d.dtype) if hasattr(lazy.weight, "d") else str(lazy.weight.codes.dtype),
                      "grad": bool(torch.isfinite(lazy.adapters["default"].lora_A.grad.cpu()).all())}}
print(json.dumps(out))
"""


def test_every_type_dequantizes_on_xla_as_on_the_cpu_and_trains_an_adapter():
    """XLA may fuse a product and a sum into one rounding, so equal to float32 rounding, not bit for bit."""
    import os

    result = run_xla(GGUF_ON_XLA.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                        types=list(BLOCK_LAYOUTS) + ["BF16"]))
    for ggml_type, r in result.items():
        assert r["weight"] <= 4 * torch.finfo(torch.float32).eps, (ggml_type, r)
        assert r["grad"], ggml_type
    assert result["Q4_K"]["dtype"] == "torch.float16"  # the scales moved, not cast
