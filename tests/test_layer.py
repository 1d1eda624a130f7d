"""LoRALinear and LoRAAdapter: ownership of the base parameters, PEFT's init, the unmerged forward,
dtypes, dropout, and that the out x in product B·A is never formed in forward or backward."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import assert_close_to_rounding
from minilora import LoRALinear, QuantLinear
from minilora.weight import QuantizedBaseError


def lora_linear(in_features=48, out_features=80, r=4, alpha=8.0, bias=True, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    layer = LoRALinear(base)
    layer.add_adapter("default", r, alpha, **kw)
    layer.active_adapter = "default"
    return base, layer


def test_owns_the_very_parameters_of_the_linear_it_replaces():
    base, layer = lora_linear()
    assert layer.weight is base.weight and layer.bias is base.bias
    # the base keys as nn.Linear had them, and only the adapter's two matrices besides
    assert list(layer.state_dict()) == ["weight", "bias", "adapters.default.lora_A", "adapters.default.lora_B"]


def test_shapes_follow_peft_a_is_r_by_in_and_b_is_out_by_r():
    _, layer = lora_linear(in_features=48, out_features=80, r=4)
    assert layer.lora_A.shape == (4, 48) and layer.lora_B.shape == (80, 4)


def test_init_is_peft_kaiming_uniform_a_and_zero_b():
    _, layer = lora_linear(in_features=1024, out_features=8, r=64)
    a = layer.lora_A.detach()
    # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
    bound = 1 / math.sqrt(1024)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.99 * bound  # it fills the range, not a narrower one
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # uniform std is bound / sqrt(3)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_gaussian_init_draws_a_with_std_one_over_r():
    _, layer = lora_linear(in_features=4096, out_features=8, r=16, init="gaussian")
    assert abs(layer.lora_A.detach().std().item() - 1 / 16) < 0.002
    assert torch.count_nonzero(layer.lora_B) == 0


def test_scaling_is_alpha_over_r_and_alpha_over_sqrt_r_with_rslora():
    assert lora_linear(r=4, alpha=8)[1].scaling == 2.0
    assert lora_linear(r=16, alpha=8, use_rslora=True)[1].scaling == 8 / 4


def test_fresh_adapter_computes_exactly_what_the_base_computes():
    base, layer = lora_linear()
    x = torch.randn(3, 5, 48)
    assert torch.equal(layer(x), base(x))


def test_unmerged_forward_is_base_plus_x_at_a_t_at_b_t_times_scaling():
    _, layer = lora_linear(r=4, alpha=12)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 48)
    w, b, a, bb = (t.double() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    expected = x.double() @ w.T + b + (x.double() @ a.T @ bb.T) * 3.0
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_bf16_base_keeps_float32_adapter_and_returns_the_input_dtype():
    _, layer = lora_linear(dtype=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    out = layer(torch.randn(2, 48, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32  # master weights stay float32 under a bf16 base


def test_float32_base_with_float32_input_returns_float32():
    _, layer = lora_linear()
    assert layer(torch.randn(2, 48)).dtype == torch.float32


def test_a_plain_base_weight_follows_nn_linear_dtype_rules_and_is_never_cast_by_the_layer():
    base, layer = lora_linear(bias=False)  # float32 base and adapter; no bias, which would refuse bf16 by itself
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    # Without autocast nn.Linear refuses a bf16 input to a float32 weight; so does the layer that
    # replaces it (rather than silently making a bf16 copy of the weight in every forward).
    with pytest.raises(RuntimeError) as plain:
        base(x)
    with pytest.raises(RuntimeError) as adapted:
        layer(x)
    assert type(adapted.value) is type(plain.value)
    # Under autocast the base GEMM is autocast's, as for nn.Linear: same dtype and same bits with a fresh
    # adapter, and gradients reach the adapter through the backward's own cast.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = base(x.float()), layer(x.float())
    assert out.dtype == expected.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32


class OpRecorder(TorchDispatchMode):
    """Records (op name, output tensor) of every aten op that runs, forward and backward."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), t))
        return out


def full_size_products(recorder, weight):
    """Op outputs shaped like the weight (or its transpose) that are not views of the weight itself."""
    shapes = {tuple(weight.shape), tuple(weight.shape[::-1])}
    storage = weight.untyped_storage().data_ptr()
    return [name for name, t in recorder.ops
            if tuple(t.shape) in shapes and t.untyped_storage().data_ptr() != storage]


def test_unmerged_forward_and_backward_never_form_an_out_by_in_tensor():
    _, layer = lora_linear(in_features=48, out_features=80, r=4)
    layer.weight.requires_grad_(False)  # frozen, as inject leaves it
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 48, requires_grad=True)  # 6 rows: no activation is (80, 48) or (48, 80)
    with OpRecorder() as recorder:
        layer(x).sum().backward()
    assert full_size_products(recorder, layer.weight) == []
    assert layer.lora_A.grad is not None and layer.weight.grad is None

    with OpRecorder() as recorder:  # the detector does see B·A when it is formed (as merging does)
        layer.adapters["default"].delta_weight()
    assert full_size_products(recorder, layer.weight) != []


def test_dropout_zero_is_identity_and_runs_no_dropout_op():
    _, layer = lora_linear(dropout=0.0)
    assert isinstance(layer.adapters["default"].dropout, nn.Identity)
    layer.train()
    with OpRecorder() as recorder:
        layer(torch.randn(4, 48))
    assert not [n for n, _ in recorder.ops if "dropout" in n or "bernoulli" in n]

    _, layer = lora_linear(dropout=0.1)  # and a real dropout does show up to the same check
    layer.train()
    with OpRecorder() as recorder:
        layer(torch.randn(4, 48))
    assert [n for n, _ in recorder.ops if "dropout" in n or "bernoulli" in n]


def test_dropout_applies_to_the_adapter_input_only_in_train_mode():
    base, layer = lora_linear(dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 48)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.equal(layer(x), base(x))  # dropout never touches the base path


def test_a_new_layer_takes_the_mode_of_the_linear_it_replaces():
    base = nn.Linear(8, 8).eval()
    layer = LoRALinear(base)
    adapter = layer.add_adapter("default", 2, 4.0, dropout=0.5)
    assert not layer.training and not adapter.training


def test_no_active_adapter_means_the_base_output():
    base, layer = lora_linear()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.active_adapter = None
    x = torch.randn(2, 48)
    assert torch.equal(layer(x), base(x))


def test_wrapping_something_other_than_linear_is_refused():
    with pytest.raises(TypeError, match="wraps nn.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1))


def test_adding_an_adapter_name_twice_is_refused():
    _, layer = lora_linear()
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        layer.add_adapter("default", 4, 8.0)


class RowScaledWeight(nn.Module):
    """A stored weight that is not minilora's own: float16 rows times a float32 scale per row, with
    QuantizedWeight's interface (what a GGUF block type, say, would offer)."""

    def __init__(self, weight: torch.Tensor, tile_rows: int):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype, self.tile_rows = weight.dtype, tile_rows
        scale = weight.abs().amax(1).clamp(min=1e-12)
        self.register_buffer("rows", (weight / scale.unsqueeze(1)).half())
        self.register_buffer("row_scale", scale.float())

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def dequantize(self, dtype=None) -> torch.Tensor:
        return self.dequantize_rows(slice(None), dtype)

    def dequantize_rows(self, rows, dtype=None) -> torch.Tensor:
        return (self.rows[rows].float() * self.row_scale[rows].unsqueeze(1)).to(dtype or self.dtype)

    def row_tiles(self) -> list[slice]:
        return [slice(i, min(i + self.tile_rows, self.out_features)) for i in range(0, self.out_features, self.tile_rows)]

    def nbytes(self) -> int:
        return self.rows.numel() * 2 + self.row_scale.numel() * 4


@pytest.mark.parametrize("tile_rows", [80, 24])  # the whole weight at once, and in four row tiles
def test_any_stored_weight_with_the_interface_works_as_a_base_without_naming_its_scheme(tile_rows):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80)
    stored = RowScaledWeight(linear.weight.detach(), tile_rows)
    layer = LoRALinear(QuantLinear(stored, linear.bias))
    adapter = layer.add_adapter("default", 4, 8.0)
    layer.active_adapter = "default"
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(3, 5, 48, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)

    dense, a, b = stored.dequantize(), adapter.lora_A.detach().requires_grad_(), adapter.lora_B.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    expected = nn.functional.linear(xr, dense, linear.bias) + xr @ a.T @ b.T * 2.0
    expected.backward(g)
    assert_close_to_rounding(out, expected, reduction=48 + 4)
    for ours, reference in ((x.grad, xr.grad), (adapter.lora_A.grad, a.grad), (adapter.lora_B.grad, b.grad)):
        assert_close_to_rounding(ours, reference, reduction=48 + 80)
    with torch.no_grad():
        assert_close_to_rounding(layer(x), expected, reduction=48 + 4)
    assert layer.quantized and layer.to_linear().weight is stored
    with pytest.raises(QuantizedBaseError, match="cannot merge"):
        layer.merge()
