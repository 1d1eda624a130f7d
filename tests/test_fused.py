"""minilora/fused.py: the fused training forward and backward compute what LoRAAdapter.forward
writes out, ``base(x) + B(A(drop(x))) * scale``: against composed torch ops with the same dropout
mask, on both CPU mask paths, and against the layer's own plain formula."""

import pytest
import torch
from torch import nn

import minilora
from conftest import assert_close_to_rounding, dropout_lora_layer
from minilora import dropout, fused


# Each CPU path is tested on every machine: bernoulli_ (ATen's MKL kernel on Intel CPUs) and the
# random-word draw (elsewhere); bool is the mask CPUs and GPUs draw, float the one XLA draws.
# x_grad False: the input needs no gradient (the first layer's projections over a frozen
# embedding), so backward applies the mask to x alone, writing into its converted copy.
@pytest.mark.parametrize("vectorised_bernoulli", [False, True])
@pytest.mark.parametrize("mask_dtype,dtype,x_grad", [("float", torch.float32, True), ("bool", torch.float32, True),
                                                     ("bool", torch.float32, False), ("bool", torch.bfloat16, True)])
def test_dropout_trains_exactly_as_composed_torch_ops_with_the_same_mask(mask_dtype, dtype, x_grad,
                                                                       vectorised_bernoulli, monkeypatch):
    monkeypatch.setattr(dropout, "cpu_bernoulli_is_vectorised", lambda: vectorised_bernoulli)
    if mask_dtype == "float":
        draw = dropout.dropout_mask
        monkeypatch.setattr(dropout, "dropout_mask", lambda x, p, site=0: draw(x, p).to(x.dtype))

    layer, adapter = dropout_lora_layer(48, 80, 4, 8.0, 0.25, dtype)
    x = torch.randn(2, 5, 48, dtype=dtype, requires_grad=x_grad)
    torch.manual_seed(7)
    layer.train()(x).float().square().sum().backward()
    got = (adapter.lora_A.grad.clone(), adapter.lora_B.grad.clone()) + ((x.grad.clone(),) if x_grad else ())

    torch.manual_seed(7)
    keep = dropout.dropout_mask(x, 0.25)  # the same draw the layer made
    assert keep.dtype == (torch.bool if mask_dtype == "bool" else x.dtype)
    x.grad = adapter.lora_A.grad = adapter.lora_B.grad = None
    a, b = adapter.lora_A, adapter.lora_B
    xf = x.float()  # the reference in float32, from the same (rounded) inputs
    y = nn.functional.linear(xf, layer.weight.float(), layer.bias.float()) + (xf * keep / 0.75) @ a.T @ b.T * adapter.scaling
    y.square().sum().backward()
    for ours, reference in zip(got, (a.grad, b.grad) + ((x.grad,) if x_grad else ())):
        if dtype == torch.float32:
            # The same arithmetic in another order: the fused node adds the adapter inside the base
            # GEMM. Its longest sums run over the 48 inputs plus the 80 outputs (x's gradient).
            assert_close_to_rounding(ours, reference, reduction=48 + 80)
        else:
            # bfloat16 GEMMs accumulate in float32 and round their results: the fused node rounds
            # each intermediate (the r-wide product, the output, the gradients' products) to
            # bfloat16 once, at most 6 roundings along any path, each within bfloat16's eps of the
            # largest value. A wrong mask moves a quarter of the terms.
            eps = torch.finfo(dtype).eps
            scale = reference.abs().max().item()
            torch.testing.assert_close(ours.float(), reference.float(), rtol=6 * eps, atol=6 * eps * scale)


@pytest.mark.parametrize("vectorised_bernoulli", [False, True])
def test_the_mask_converts_through_its_bytes_to_exactly_its_float_and_bfloat16_values(vectorised_bernoulli,
                                                                                      monkeypatch):
    # _multiplier reads the bool mask's bytes as int8 (vectorised); that is the mask only if every
    # byte either draw writes is 0 or 1, on both CPU paths.
    monkeypatch.setattr(dropout, "cpu_bernoulli_is_vectorised", lambda: vectorised_bernoulli)
    x = torch.zeros(300, 257)  # an odd element count: the random-word draw's last word is cut
    for p in (0.05, 0.5, 0.999):
        keep = dropout.dropout_mask(x, p)
        assert set(keep.view(torch.int8).unique().tolist()) <= {0, 1}
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(fused._multiplier(keep, x.to(dtype)), keep.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", ["plain", "nf4", "none"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_the_fused_node_computes_what_the_plain_formula_computes(dtype, base, p):
    # LoRAAdapter.forward runs base(x) + B(A(drop(x))) * scale as written when autograd is off, and
    # through the fused node when it records; the same seed draws the same mask on both paths.
    torch.manual_seed(0)
    linear = nn.Linear(48, 80).to(dtype)
    layer = minilora.LoRALinear(minilora.QuantLinear.from_linear(linear, "nf4") if base == "nf4" else linear)
    adapter = layer.add_adapter("default", 4, 8.0, dropout=p)
    with torch.no_grad():
        adapter.lora_B.normal_()
    weight, bias = (None, None) if base == "none" else (layer.weight, layer.bias)
    x = torch.randn(2, 5, 48, dtype=dtype)
    torch.manual_seed(7)
    through_node = adapter.train()(x, weight, bias)
    assert through_node.grad_fn is not None and "LoRAFunction" in type(through_node.grad_fn).__name__
    torch.manual_seed(7)
    with torch.no_grad():
        as_written = adapter(x, weight, bias)
    assert as_written.dtype == through_node.dtype == dtype
    if dtype == torch.float32:
        assert_close_to_rounding(through_node, as_written, reduction=48 + 4)
    else:
        # Each path rounds the r-wide product, the adapter term, the base output and the sum to
        # bfloat16 in its own order: at most 6 roundings along any path (as in the test above),
        # each within bfloat16's eps of the largest value.
        eps, scale = torch.finfo(dtype).eps, as_written.abs().max().item()
        torch.testing.assert_close(through_node, as_written, rtol=6 * eps, atol=6 * eps * scale)
