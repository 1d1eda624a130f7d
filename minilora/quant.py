"""A frozen base in 4 bits (NF4, as QLoRA) or 8 bits (int8 per row), in plain torch ops, so the
same code runs eagerly on CPU and CUDA and is traced by XLA.

    minilora.quantize(model, "nf4")   # every Linear but the LM head: 4-bit codes, blockwise scales
    minilora.inject(model, r=16)      # adapters over the quantized Linears, as over plain ones
    ...train...                       # the base is dequantized one layer at a time, in forward and backward
    minilora.save_adapter(model, "out/")  # an ordinary adapter: it loads on the bf16 base too

NF4 follows bitsandbytes' layout (``quantize_4bit(..., quant_type="nf4", blocksize=64,
compress_statistics=True)``), so the codes can be compared with it byte for byte:
    codes      ((n + 1) // 2,) uint8  the weight flattened row-major, two codes per byte, the first
                                      element of each pair in the high nibble (n = out × in)
    absmax     (ceil(n / 64),) uint8  each block's absmax minus their mean, quantized with
                                      bitsandbytes' signed 8-bit dynamic code in blocks of 256
    absmax_scale (ceil(n / 64 / 256),) float32   the second-level absmax of each 256 block scales
    absmax_offset (1,) float32        the mean that was subtracted
Without double quantization ``absmax`` is the (ceil(n / 64),) float32 block absmax itself.
Each element's code is the NF4 value nearest to ``w / absmax`` (ties go to the lower value,
as ``torch.bucketize`` does in bitsandbytes' torch backend); dequantization is
``code[q] * absmax`` in float32, cast to the compute dtype, as bitsandbytes does.

int8 (per output row, the layout of bitsandbytes' ``int8_vectorwise_quant``): ``codes``
(out, in) int8 = round(w · 127 / absmax_row) and ``absmax`` (out,) float32;
dequantization is ``codes · absmax / 127``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("nf4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' choices
SCALE_BLOCK = 256  # double quantization's block of block scales (bitsandbytes and the paper)

# bitsandbytes' NF4 code book (functional.get_4bit_type("nf4")): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact 0. As float32, the dtype bitsandbytes keeps it in.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def dynamic_code() -> torch.Tensor:
    """(256,) float32: bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map()``), which
    double quantization uses for the block scales: for each power of ten from 1e-6 to 1, evenly
    spaced fraction values (more of them in the larger decades), their negatives, 0 and 1, sorted."""
    values = []
    for i in range(7):  # max_exponent_bits = 7, total_bits = 8, signed: no extra linear items
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        # float32 products, as bitsandbytes forms them (a float64 product can round differently)
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]  # 2 · (1 + 2 + … + 64) + 2 = 256 values
    return torch.tensor(sorted(values), dtype=torch.float32)


# -- quantizing one tensor -------------------------------------------------------------------------

def _blockwise(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code indices (blocks · blocksize,) int32 and block absmax (blocks,) float32 of a
    float32 vector (n,), blocks = ceil(n / blocksize), as bitsandbytes' torch backend computes
    them: full blocks multiply by 1/absmax, a partial last block divides by its absmax, and the
    padding past n is zeros (the code nearest to 0)."""
    n = flat.numel()
    blocks = math.ceil(n / blocksize)
    padded = F.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)  # zeros leave absmax alone
    absmax = padded.abs().amax(dim=1)
    scaled = padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    if n % blocksize:
        scaled[-1] = padded[-1] / absmax[-1].clamp(min=1e-38)
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled.clamp(-1, 1).reshape(-1), bounds, out_int32=True)
    return q, absmax


def _expand_blocks(values: torch.Tensor, scales: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """The first n of ``values`` times the scale of their block, (n,) float32: a reshape and a
    broadcast multiply, no per-element gather of scales. ``values`` is a scratch tensor: it is
    overwritten when it is already as long as the blocks (no second (n,) float32 tensor)."""
    padded = scales.numel() * blocksize
    if values.numel() >= padded:
        return values[:padded].view(-1, blocksize).mul_(scales.unsqueeze(1)).view(-1)[:n]
    values = F.pad(values, (0, padded - values.numel()))
    return values.view(-1, blocksize).mul_(scales.unsqueeze(1)).view(-1)[:n]


class QuantizedWeight(nn.Module):
    """A frozen (out, in) weight stored quantized; ``dequantize()`` gives it back in the compute
    dtype. Its tensors are buffers (they follow ``.to(device)`` and appear in the state dict
    under ``<linear>.weight.<name>``); a dtype conversion of the model (``model.to(bf16)``,
    ``.half()``) changes the compute dtype only and never touches the codes or scales.

    Attributes: ``scheme`` (nf4, int8), ``shape`` (out, in), ``dtype`` (the compute dtype: the
    original weight's, or the last one the model was converted to), ``blocksize``,
    ``double_quant``.
    """

    def __init__(self, weight: torch.Tensor, scheme: str = "nf4", blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        _check_scheme(scheme, blocksize)
        self.scheme, self.blocksize, self.double_quant = scheme, blocksize, double_quant and scheme == "nf4"
        self.shape = torch.Size(weight.shape)
        self.dtype = weight.dtype
        w = weight.detach().float()
        if scheme == "int8":
            absmax = w.abs().amax(dim=1)  # (out,)
            codes = torch.round(w * (127.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-127, 127)
            self.register_buffer("codes", codes.to(torch.int8))  # (out, in)
            self.register_buffer("absmax", absmax)  # (out,)
            return
        code = torch.tensor(NF4_CODE, device=w.device)
        n = w.numel()
        q, absmax = _blockwise(w.reshape(-1), code, blocksize)
        q8 = q[:n + n % 2].to(torch.uint8)  # an odd n pads with the code of 0, as bitsandbytes
        self.register_buffer("codes", (q8[0::2] << 4) | q8[1::2])  # ((n + 1) // 2,)
        # Dequantization looks up both codes of a byte at once: byte -> (high value, low value).
        pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)  # (256, 2)
        self.register_buffer("pair_code", pairs, persistent=False)
        if self.double_quant:
            offset = absmax.mean()
            dyn = dynamic_code().to(w.device)
            q_abs, absmax2 = _blockwise(absmax - offset, dyn, SCALE_BLOCK)
            self.register_buffer("absmax", q_abs[:absmax.numel()].to(torch.uint8))  # (blocks,)
            self.register_buffer("absmax_scale", absmax2)  # (ceil(blocks / 256),)
            self.register_buffer("absmax_offset", offset.reshape(1))
            self.register_buffer("scale_code", dyn, persistent=False)
        else:
            self.register_buffer("absmax", absmax)  # (blocks,) float32

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def block_absmax(self) -> torch.Tensor:
        """(ceil(n / blocksize),) float32: each block's scale (after double quantization's rounding)."""
        if self.scheme != "nf4" or not self.double_quant:
            return self.absmax
        blocks = self.absmax.numel()
        values = self.scale_code.index_select(0, self.absmax.to(torch.int32))
        return _expand_blocks(values, self.absmax_scale, blocks, SCALE_BLOCK) + self.absmax_offset

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (out, in) weight in ``dtype`` (default: the compute dtype), computed in float32 and
        rounded once. A new tensor every call: it lives as long as the caller keeps it."""
        dtype = dtype or self.dtype
        if self.scheme == "int8":
            return (self.codes.float() * (self.absmax / 127.0).unsqueeze(1)).to(dtype)
        n = self.shape.numel()
        # (2 · bytes,) float32; index_select: 1.6x faster than indexing on the CPU, a gather on XLA
        values = self.pair_code.index_select(0, self.codes.to(torch.int32)).view(-1)
        return _expand_blocks(values, self.block_absmax(), n, self.blocksize).view(self.shape).to(dtype)

    def nbytes(self) -> int:
        """Bytes of the stored codes and scales (what replaces the weight's out · in · itemsize);
        the code books are constants, not saved, and not counted."""
        return sum(b.numel() * b.element_size() for k, b in self._buffers.items()
                   if k not in self._non_persistent_buffers_set)

    def _apply(self, fn, recurse=True):
        # Module.to / .half() / .bfloat16() would cast the float32 scales and code books: keep
        # every buffer's dtype (moving it only), and let a float conversion set the compute dtype.
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.codes.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        for key, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def extra_repr(self) -> str:
        extra = f", blocksize={self.blocksize}, double_quant={self.double_quant}" if self.scheme == "nf4" else ""
        return f"{self.scheme}, shape={tuple(self.shape)}, dtype={self.dtype}{extra}"


def _check_scheme(scheme: str, blocksize: int) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize} is not one of {', '.join(map(str, BLOCKSIZES))} "
                         "(bitsandbytes' block sizes; QLoRA uses 64)")


# -- a Linear over a quantized weight --------------------------------------------------------------

class _DequantLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with W dequantized in forward and again in backward: only the quantized
    weight is kept between them, never the (out, in) float copy. Shapes: x (..., in), b (out,)."""

    @staticmethod
    def forward(ctx, x, bias, weight: QuantizedWeight):
        ctx.weight = weight  # a module of buffers that never change: nothing to save
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.weight.dequantize(grad.dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_b, None


def linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` for a plain weight tensor or a QuantizedWeight: (..., in) -> (..., out)."""
    if isinstance(weight, QuantizedWeight):
        return _DequantLinear.apply(x, bias, weight)
    return F.linear(x, weight, bias)


def dense(weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A plain weight tensor as it is (cast to ``dtype`` if given), a QuantizedWeight dequantized."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype)
    return weight if dtype is None else weight.to(dtype)


class QuantLinear(nn.Module):
    """What ``quantize`` puts in place of an nn.Linear: the frozen quantized ``weight`` and the
    Linear's own ``bias`` Parameter. (..., in_features) -> (..., out_features) in x's dtype.
    ``inject`` wraps it in a LoRALinear like any Linear."""

    def __init__(self, weight: QuantizedWeight, bias: Optional[nn.Parameter] = None):
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_linear(cls, base: nn.Linear, scheme: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> "QuantLinear":
        """``base``'s weight quantized, its bias Parameter kept, its train/eval mode kept."""
        return cls(QuantizedWeight(base.weight, scheme, blocksize, double_quant), base.bias).train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the dequantized weight in the compute dtype (frozen) and this bias."""
        return _dense_linear(self.weight, self.bias, self.training)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _dense_linear(weight: QuantizedWeight, bias: Optional[nn.Parameter], training: bool) -> nn.Linear:
    out, in_ = weight.shape
    linear_ = nn.Linear(in_, out, bias=bias is not None, device="meta")
    linear_.weight = nn.Parameter(weight.dequantize(), requires_grad=False)
    linear_.bias = bias
    return linear_.train(training)


# -- whole models ----------------------------------------------------------------------------------

def quantize(model: nn.Module, scheme: str = "nf4", *, target_modules="all-linear", exclude_modules=None,
             blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Store the frozen weights of the selected Linears quantized, in place; returns ``model``.

    ``target_modules`` and ``exclude_modules`` select as in LoRAConfig: ``"all-linear"`` (the
    default) is every Linear but the output head (QLoRA's choice: the head's errors go straight
    into the logits). Each layer is quantized on its own, so the float32 working copy is one
    layer's. Linears that already carry an adapter (inject before quantize) get their base
    quantized in place. Nothing changes if any selected layer cannot be quantized.

    Quantized weights do not train; adapters over them do (``inject`` after or before).
    """
    # Imported here: inject imports this module (QuantLinear is one of its targets).
    from .config import LoRAConfig
    from .inject import adapter_state, find_targets, replace_module
    from .layer import LoRALinear

    _check_scheme(scheme, blocksize)
    config = LoRAConfig(target_modules=target_modules, exclude_modules=exclude_modules)
    targets = find_targets(model, config)
    shared = _tied_elsewhere(model, {id(m) for _, m in targets})
    for name, module in targets:
        weight = module.weight
        if isinstance(weight, QuantizedWeight):
            raise ValueError(f"{name} is already quantized ({weight.scheme}); quantize a model once "
                             "(minilora.dequantize(model) gives the plain Linears back)")
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise ValueError(f"{name} is a {type(module).__name__}; quantize stores Linear weights only")
        if isinstance(module, LoRALinear) and module.merged:
            raise ValueError(f"{name} has a merged adapter; call minilora.unmerge(model) before quantizing")
        if not weight.is_floating_point():
            raise ValueError(f"{name}: cannot quantize a {weight.dtype} weight; quantize a floating-point model")
        if id(weight) in shared:
            raise ValueError(f"{name}'s weight is shared with {shared[id(weight)]} (tied embeddings?); "
                             "quantizing it would untie them and store it twice: exclude it")
    for name, module in targets:
        if isinstance(module, LoRALinear):
            quantized = QuantizedWeight(module.weight, scheme, blocksize, double_quant)
            del module.weight  # the Parameter; a module of buffers takes its name
            module.weight = quantized
        else:
            replace_module(model, name, QuantLinear.from_linear(module, scheme, blocksize, double_quant))
    adapter_state(model).layers = None  # LoRA layers may have been swapped
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Put plain weights back, in the compute dtype: QuantLinear -> nn.Linear, and a LoRALinear's
    quantized base -> a frozen Parameter (its adapters stay). The weights are what forward used,
    not the original ones: quantization's rounding stays. Returns ``model``."""
    from .inject import adapter_state, replace_module
    from .layer import LoRALinear

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            replace_module(model, name, module.to_linear())
        elif isinstance(module, LoRALinear) and isinstance(module.weight, QuantizedWeight):
            weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
            del module.weight
            module.weight = weight
    adapter_state(model).layers = None  # LoRA layers may have been swapped
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedWeight]]:
    """(name of the Linear, its QuantizedWeight) for every quantized layer."""
    return [(name.rpartition(".")[0], m) for name, m in model.named_modules() if isinstance(m, QuantizedWeight)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: parameters (tied ones once) and quantized codes
    and scales (code books excluded: constants, not saved)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(w.nbytes() for _, w in quantized_layers(model))


def _tied_elsewhere(model: nn.Module, chosen: set) -> dict:
    """id(parameter) -> module name, for parameters of modules not chosen."""
    owners = {}
    for name, module in model.named_modules():
        if id(module) in chosen:
            continue
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), f"{name}.{pname}" if name else pname)
    return owners
