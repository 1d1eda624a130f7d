"""The fused LoRA forward and backward: ``lora_linear``, what an adapter runs when autograd records.

It computes the sum LoRAAdapter.forward writes out,

    y = base(x) + B(A(drop(x))) * scale,    base(x) = x Wᵀ + b,

as one autograd node. Why it exists: composed torch ops keep, for backward, the dropped copy of x
*and* its mask for every adapted Linear (or the scaled (…, out) term); this node keeps the byte
mask alone and recomputes x ⊙ keep in backward. It also adds the adapter term inside the base
GEMM's output (``addmm_``) rather than as a separate (…, out) sum, and in backward the adapter's
input gradient into the base one the same way. docs/benchmarks.md has the memory and time this
saves and the commands that measure them; tests/test_fused.py holds it to the plain formula.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import LoRADropout
from .weight import add_input_grad, base_linear, is_quantized


def lora_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: torch.Tensor, dropout: Optional[nn.Module] = None) -> torch.Tensor:
    """``base(x) + B(A(drop(x))) * scale`` as one autograd node: (..., in) -> (..., out).

    ``weight`` (out, in): a plain tensor or a stored one (minilora.weight), or None for the adapter
    term alone; ``bias`` (out,) or None; ``lora_A`` (r, in); ``lora_B`` (out, r); ``scale`` (1,);
    ``dropout``: the adapter's LoRADropout (None or nn.Identity: nothing dropped). The output has
    x's dtype, or the base GEMM's under autocast.
    """
    keep = dropout.keep_mask(x) if isinstance(dropout, LoRADropout) else None
    if keep is not None:
        scale = scale / (1.0 - dropout.p)  # inverted dropout's 1/(1-p), on the r-wide side
    return _LoRAFunction.apply(x, weight, bias, lora_A, lora_B, scale, keep)


def _multiplier(keep: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The mask as ``_apply_mask`` applies it to ``t`` fastest: a bool mask stays bool on GPUs (a
    select, one fused kernel); on the CPU a select, and a multiply by a bool tensor, take ATen's
    slower mixed-dtype paths, so the mask becomes t's dtype (a transient copy; convert once and
    reuse it where it is applied twice). It is converted from its bytes viewed as int8 (0 or 1):
    ATen converts int8 with vector instructions and bool element by element (docs/benchmarks.md
    has the times, from ``python scripts/lab/cpu_probes.py mask``), except under torch.compile, which
    fuses the conversion into its own kernel and cannot lower the view."""
    if keep.dtype == torch.bool and t.device.type == "cpu":
        return keep.to(t.dtype) if torch.compiler.is_compiling() else keep.view(torch.int8).to(t.dtype)
    return keep


def _apply_mask(t: torch.Tensor, keep: torch.Tensor, inplace: bool = False, into_keep: bool = False) -> torch.Tensor:
    """t ⊙ keep in t's dtype (keep bool or t's dtype; see _multiplier), in place on ``t`` when
    allowed, or written into ``keep`` when it is a transient of t's dtype that _multiplier made
    (``into_keep``): either way no further (N, in) tensor is allocated. On the CPU a fresh tensor of
    this size is fresh pages from the kernel, whose first touch costs more than the multiply."""
    if keep.dtype == torch.bool:
        return torch.where(keep, t, 0)
    if inplace:
        return t.mul_(keep)
    return keep.mul_(t) if into_keep and keep.dtype == t.dtype else t * keep


class _LoRAFunction(torch.autograd.Function):
    """``x Wᵀ + b + ((x ⊙ keep) Aᵀ · scale) Bᵀ`` as one autograd node (the module doc says why).
    W None: the adapter term alone; a plain tensor: used as it is, as nn.Linear would; a stored
    weight (minilora.weight): dequantized here and again in backward, tile by tile above
    weight.TILE_ELEMENTS, so only its codes are kept in between. Shapes: x (..., in), W (out, in),
    A (r, in), B (out, r), scale (1,), keep like x (its dtype or bool). No (out, in) tensor is ever
    formed (unless W itself trains).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, keep):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        dropped = x2
        if keep is not None:
            keep2 = keep.reshape(x2.shape)
            multiplier = _multiplier(keep2, x2)
            dropped = _apply_mask(x2, multiplier, into_keep=multiplier is not keep2)
        # (N, r); A is cast to x's dtype (an r-wide cast) and the scaling is applied in float32
        narrow = F.linear(dropped, lora_A.to(x.dtype)) * scale
        if weight is None:
            narrow = narrow.to(x.dtype)
            out = F.linear(narrow, lora_B.to(x.dtype))  # (N, out)
        else:
            out = base_linear(x2, weight, bias)  # (N, out); a plain weight goes to F.linear as it is
            narrow = narrow.to(out.dtype)
            out.addmm_(narrow, lora_B.to(out.dtype).t())
        ctx.quantized = weight if weight is not None and is_quantized(weight) else None
        ctx.save_for_backward(x, None if ctx.quantized else weight, lora_A, lora_B, scale, keep, narrow)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_A, lora_B, scale, keep, narrow = ctx.saved_tensors
        if ctx.quantized is not None:
            weight = ctx.quantized
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dt = narrow.dtype  # the GEMMs' dtype: x's, or the base output's under autocast
        g = grad.reshape(-1, grad.shape[-1]).to(dt)  # (N, out)
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        g_narrow = ((g @ lora_B.to(dt)) * scale).to(dt)  # (N, r)
        if need_B:
            grad_B = (g.t() @ narrow).to(lora_B.dtype)  # (out, r)
        x2 = x.reshape(-1, x.shape[-1])
        multiplier = transient = None
        if keep is not None:  # used twice below: on x's gradient, then (its last use) on x
            keep2 = keep.reshape(x2.shape)
            multiplier = _multiplier(keep2, x2)
            transient = multiplier is not keep2
        if need_x:
            grad_x = g_narrow @ lora_A.to(dt)  # (N, in)
            if multiplier is not None:
                grad_x = _apply_mask(grad_x, multiplier, inplace=True)
            if weight is not None:
                grad_x = add_input_grad(grad_x, g, weight)
            grad_x = grad_x.to(x.dtype).view(x.shape)
        if need_A:
            dropped = x2 if multiplier is None else _apply_mask(x2, multiplier, into_keep=transient)
            grad_A = (g_narrow.t() @ dropped.to(dt)).to(lora_A.dtype)  # (r, in)
        if need_w:  # only when the base weight itself trains
            grad_w = (g.t() @ x2.to(dt)).to(weight.dtype)
        if need_b:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None
