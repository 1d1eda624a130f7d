"""minilora/weight.py: the NF4 and int8 weight types, their layout (bitsandbytes'), their error
bounds (from the code books' spacing), and the ops that multiply by a stored weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minilora.weight
from minilora.weight import NF4_CODE, SCALE_BLOCK, QuantizedWeight, QuantLinear, dynamic_code
from conftest import assert_close_to_rounding

NF4 = torch.tensor(NF4_CODE)


def half_gaps(code: torch.Tensor) -> torch.Tensor:
    """For each code value, half the distance to its farther neighbour: the most by which a
    value rounded to it can be off, in units of the block scale."""
    gaps = (code[1:] - code[:-1]) / 2
    return torch.maximum(F.pad(gaps, (1, 0)), F.pad(gaps, (0, 1)))


def odd_weight(shape=(37, 83), seed=0, dtype=torch.float32) -> torch.Tensor:
    """Weights with an odd element count and a partial last block, and a wide range per block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 0, shape[1]).unsqueeze(0)
    return w.to(dtype)


# -- the layout: bitsandbytes' code books, packing and block scales --------------------------------

def test_nf4_code_book_is_bitsandbytes_and_dynamic_code_has_its_structure():
    # bitsandbytes' NF4: 16 sorted values, exactly -1, 0 and 1 among them, 7 below 0 and 8 above.
    assert len(NF4_CODE) == 16 and NF4_CODE == tuple(sorted(NF4_CODE))
    assert (NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]) == (-1.0, 0.0, 1.0)
    assert NF4_CODE[14] == pytest.approx(0.7229568362236023, abs=0) and NF4_CODE[1] == pytest.approx(-0.6961928009986877, abs=0)
    dyn = dynamic_code()
    # create_dynamic_map(signed=True): 256 distinct sorted values in [-1, 1], symmetric but for 1
    assert dyn.shape == (256,) and torch.equal(dyn, dyn.sort().values) and len(set(dyn.tolist())) == 256
    assert dyn[-1] == 1 and dyn[0] == -dyn[-2] and (dyn == 0).sum() == 1
    # the top decade has 64 evenly spaced means of [0.1, 1]: 0.1 + 0.9 · (k + 0.5) / 64
    assert dyn[-2].item() == pytest.approx(0.1 + 0.9 * 63.5 / 64, rel=1e-6)


def test_nf4_codes_are_packed_high_nibble_first_with_blockwise_absmax():
    # One block of 64 built from code values times 0.5 (the absmax): each element's code is its
    # index, so the bytes are known in advance.
    idx = torch.arange(64) % 16
    w = (NF4[idx] * 0.5).reshape(4, 16)
    q = QuantizedWeight(w, "nf4", double_quant=False)
    pairs = idx.view(-1, 2)
    assert torch.equal(q.codes, (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8))  # first element: high nibble
    assert q.absmax.tolist() == [0.5]
    assert torch.equal(q.dequantize(), w)  # code values times a representable scale: exact
    # An odd element count pads the last byte's low nibble with the code of 0 (index 7).
    q = QuantizedWeight(torch.tensor([[1.0, -1.0, 0.5]]), "nf4", double_quant=False)
    assert q.codes.tolist() == [15 * 16 + 0, int(torch.bucketize(torch.tensor(0.5), (NF4[1:] + NF4[:-1]) / 2)) * 16 + 7]


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_picks_the_nearest_code_and_round_trip_error_follows_the_code_spacing(double_quant):
    w = odd_weight()
    q = QuantizedWeight(w, "nf4", blocksize=64, double_quant=double_quant)
    n, bs = w.numel(), 64
    flat = F.pad(w.reshape(-1), (0, -n % bs)).view(-1, bs)
    absmax = flat.abs().amax(1, keepdim=True)
    hi, lo = q.codes.int() >> 4, q.codes.int() & 15
    codes = torch.stack((hi, lo), 1).reshape(-1)[:n]
    scaled = (flat / absmax).reshape(-1)[:n]
    # nearest code: no other code value is closer than the chosen one (up to float32 rounding of w/absmax)
    chosen = (scaled - NF4[codes]).abs()
    best = (scaled.unsqueeze(1) - NF4).abs().amin(1)
    assert (chosen <= best + 4 * torch.finfo(torch.float32).eps).all()
    # dequantization is code · block scale; the stored block scale is the absmax up to double
    # quantization's rounding, which is at most half a step of the dynamic code times the
    # second-level scale of its group of 256 blocks.
    stored = q.block_absmax()
    if double_quant:
        step = half_gaps(dynamic_code()).max() * q.absmax_scale.repeat_interleave(SCALE_BLOCK)[:len(stored)]
        assert ((stored - absmax.squeeze(1)).abs() <= step * (1 + 1e-5) + 1e-7).all()
    else:
        assert torch.equal(stored, absmax.squeeze(1))
    per_element = stored.repeat_interleave(bs)[:n]
    assert torch.equal(q.dequantize().reshape(-1), NF4[codes] * per_element)
    # |w - ŵ| <= half the local gap · absmax + |absmax - stored| (times |code| <= 1)
    bound = half_gaps(NF4)[codes] * absmax.repeat_interleave(bs)[:n] + (per_element - absmax.repeat_interleave(bs)[:n]).abs()
    err = (q.dequantize().reshape(-1) - w.reshape(-1)).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_round_trip_within_half_a_step(dtype):
    w = odd_weight(dtype=dtype)
    q = QuantizedWeight(w, "int8")
    assert q.codes.dtype == torch.int8 and q.codes.shape == w.shape and q.absmax.shape == (w.shape[0],)
    assert q.codes.abs().max() == 127  # each row's absmax maps to ±127
    step = w.float().abs().amax(1, keepdim=True) / 127
    err = (q.dequantize(torch.float32) - w.float()).abs()
    assert (err <= step / 2 * (1 + 1e-5)).all()
    # in the compute dtype: that plus one rounding to it
    assert q.dequantize().dtype == dtype
    assert ((q.dequantize().float() - w.float()).abs() <= step / 2 * 1.001 + w.float().abs() * torch.finfo(dtype).eps).all()


def test_a_dtype_conversion_changes_the_compute_dtype_and_never_the_codes():
    q = QuantizedWeight(odd_weight(), "nf4")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    layer = QuantLinear(q)
    layer.to(torch.bfloat16)
    assert q.dtype == torch.bfloat16
    for k, v in q.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert layer(torch.randn(2, 83, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert q.nbytes() == sum(v.numel() * v.element_size() for v in before.values())


# -- a Linear over a quantized weight --------------------------------------------------------------

def test_quant_linear_computes_through_the_dequantized_weight_and_saves_no_float_copy():
    base = nn.Linear(83, 37)
    base.weight.data = odd_weight()
    layer = QuantLinear.from_linear(base, "nf4")
    dense = layer.weight.dequantize()
    x = torch.randn(3, 5, 83, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert not any(t.shape == dense.shape for t in saved)  # only the codes stay between forward and backward
    g = torch.randn_like(out)
    out.backward(g)
    assert_close_to_rounding(out, F.linear(x, dense, base.bias), reduction=83)
    assert_close_to_rounding(x.grad, g @ dense, reduction=37)
    assert base.bias.grad is not None  # a bias that requires grad still gets one


# -- rows and tiles: an embedding lookup, a large head ---------------------------------------------

@pytest.mark.parametrize("scheme, double_quant, shape", [
    ("nf4", True, (37, 128)), ("nf4", False, (37, 128)),  # rows of whole blocks
    ("nf4", True, (37, 83)), ("nf4", False, (37, 83)),    # rows starting inside a block, odd sizes
    ("int8", False, (37, 83)),
])
def test_dequantized_rows_are_the_whole_weight_rows_bit_for_bit(scheme, double_quant, shape):
    q = QuantizedWeight(odd_weight(shape, dtype=torch.bfloat16), scheme, double_quant=double_quant)
    whole = q.dequantize()
    ids = torch.tensor([36, 0, 5, 5, 17])  # repeats and both ends
    assert torch.equal(q.dequantize_rows(ids), whole[ids])
    assert torch.equal(q.dequantize_rows(slice(3, 29), torch.float32), q.dequantize(torch.float32)[3:29])


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_weight_above_the_tile_size_is_quantized_and_multiplied_tile_by_tile_never_whole(scheme, monkeypatch):
    w = odd_weight((37, 128))
    whole = QuantizedWeight(w, scheme)
    monkeypatch.setattr(minilora.weight, "TILE_ELEMENTS", 640)  # 10 blocks of 64: 5 rows a tile
    tiled = QuantizedWeight(w, scheme)
    assert len(tiled.row_tiles()) == 8 and max(t.stop - t.start for t in tiled.row_tiles()) * 128 <= 640
    assert all(torch.equal(a, b) for a, b in zip(tiled.state_dict().values(), whole.state_dict().values()))
    dense = whole.dequantize()

    def refuse(*_):
        raise AssertionError("the whole weight was dequantized")
    monkeypatch.setattr(QuantizedWeight, "dequantize", refuse)
    x = torch.randn(3, 4, 128, requires_grad=True)
    out = QuantLinear(tiled)(x)
    g = torch.randn_like(out)
    out.backward(g)
    assert_close_to_rounding(out, x @ dense.t(), reduction=128)
    assert_close_to_rounding(x.grad, g @ dense, reduction=37)
