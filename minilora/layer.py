"""LoRALinear: a frozen nn.Linear plus named low-rank adapters, computed as x @ Aᵀ @ Bᵀ."""

from __future__ import annotations

import functools
import itertools
import math
import platform
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import quant


# -- the dropout mask ------------------------------------------------------------------------------

def _mask_dtype(x: torch.Tensor) -> torch.dtype:
    """The keep mask's dtype for x: bool (one byte an element), except on XLA, where the mask takes
    x's dtype and the compiler keeps or fuses it as it decides."""
    return x.dtype if x.device.type == "xla" else torch.bool


def _draw_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A keep mask shaped like ``x`` (dtype ``_mask_dtype(x)``): True (1) with probability 1 - p,
    else False (0), each element independently.

    The mask is saved for backward in every adapted Linear; as bool it takes a quarter of a
    float32 mask's memory and half a bf16 one's. docs/benchmarks.md has the measurements and the
    commands that repeat them.

    ``bernoulli_`` wherever torch has a vectorised kernel for it: GPUs, XLA, and CPUs where ATen
    hands it to MKL (Intel CPUs). Elsewhere ATen runs a scalar loop that turns a 64-bit
    Mersenne-Twister draw into a double per element; here each 64-bit
    draw gives four elements a 16-bit uniform each, compared with p rounded to a multiple of
    2⁻¹⁶: each element is dropped with probability p' where |p' - p| ≤ 2⁻¹⁷ (7.6e-6; for
    p = 0.05, p' = 3277 / 65536 = 0.0500031).
    """
    if x.device.type != "cpu" or _cpu_bernoulli_is_vectorised():
        return torch.empty_like(x, dtype=_mask_dtype(x)).bernoulli_(1.0 - p)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits random
    uniform = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-2¹⁵, 2¹⁵)
    return torch.ge(uniform, min(round(p * 2**16), 2**16 - 1) - 2**15)


@functools.lru_cache(maxsize=None)
def _cpu_bernoulli_is_vectorised() -> bool:
    """ATen's own test for its MKL bernoulli_ kernel: built with MKL and running on an Intel CPU."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:
        return "intel" in platform.processor().lower()


# A registered op rather than a plain function so that the mask shows up by name, as
# minilora::dropout_mask, in profiles and to dispatch-level tools (the tests' op recorder).
# CompositeExplicitAutograd: one Python implementation for every device (on XLA it is traced).
# The fake implementation tells torch.compile (FakeTensor tracing) what the real one returns on
# x's device: both take the dtype from _mask_dtype, so they cannot disagree.
# Under torch.compile the mask must be drawn once per call, as in eager: the tag keeps AOTAutograd's
# partitioner from redrawing it in backward, and ``site`` (an integer per adapter, unused by the
# draw) keeps its common-subexpression pass, which spares only aten's own random ops, from merging
# the calls of q, k and v, whose arguments are otherwise equal, into one shared mask.
_ops = torch.library.Library("minilora", "FRAGMENT")
if not hasattr(torch.ops.minilora, "dropout_mask"):  # importing this module a second time
    _ops.define("dropout_mask(Tensor x, float p, int site=0) -> Tensor", tags=(torch.Tag.nondeterministic_seeded,))
    _ops.impl("dropout_mask", lambda x, p, site=0: _draw_keep_mask(x, p), "CompositeExplicitAutograd")
    torch.library.register_fake("minilora::dropout_mask",
                                lambda x, p, site=0: torch.empty_like(x, dtype=_mask_dtype(x)), lib=_ops)
_SITES = itertools.count()


def dropout_mask(x: torch.Tensor, p: float, site: int = 0) -> torch.Tensor:
    """(..., in) keep mask, True with probability 1 - p: bool, or x's dtype on XLA (see _draw_keep_mask).
    ``site`` tells apart the masks of Linears reading the same x (see above); it changes no value."""
    return torch.ops.minilora.dropout_mask(x.detach(), p, site)


def _multiplier(keep: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The mask as ``_apply_mask`` applies it to ``t`` fastest: a bool mask stays bool on GPUs (a
    select, one fused kernel); on the CPU a select, and a multiply by a bool tensor, take ATen's
    slower mixed-dtype paths, so the mask becomes t's dtype (a transient copy; convert once and
    reuse it where it is applied twice). It is converted from its bytes viewed as int8 (0 or 1):
    ATen converts int8 with vector instructions and bool element by element (0.06 against 0.49
    ms to float32, 0.10 against 0.83 ms to bfloat16, for a (1024, 576) mask on one thread:
    scripts/cpu_probes.py mask), except
    under torch.compile, which fuses the conversion into its own kernel and cannot lower the view."""
    if keep.dtype == torch.bool and t.device.type == "cpu":
        return keep.to(t.dtype) if torch.compiler.is_compiling() else keep.view(torch.int8).to(t.dtype)
    return keep


def _apply_mask(t: torch.Tensor, keep: torch.Tensor, inplace: bool = False, into_keep: bool = False) -> torch.Tensor:
    """t ⊙ keep in t's dtype (keep bool or t's dtype; see _multiplier), in place on ``t`` when
    allowed, or written into ``keep`` when it is a transient of t's dtype that _multiplier made
    (``into_keep``): either way no further (N, in) tensor is allocated. On the CPU a fresh tensor of
    this size is fresh pages from the kernel, whose first touch costs several times the multiply."""
    if keep.dtype == torch.bool:
        return torch.where(keep, t, 0)
    if inplace:
        return t.mul_(keep)
    return keep.mul_(t) if into_keep and keep.dtype == t.dtype else t * keep


# -- one autograd node per adapted Linear ----------------------------------------------------------

class _LoRAFunction(torch.autograd.Function):
    """``x Wᵀ + b + ((x ⊙ keep) Aᵀ · scale) Bᵀ`` as one autograd node (``W = None``: the adapter
    term alone; W a plain tensor: used as it is, as nn.Linear would; W a quant.QuantizedWeight:
    dequantized here and again in backward, tile by tile above quant.TILE_ELEMENTS, so only its
    codes are kept in between). Shapes: x (..., in), W (out, in), A (r, in), B (out, r), scale
    (1,), keep like x (its dtype or bool).

    What it saves over composing torch ops: the adapter term is added inside the base GEMM's
    output (``addmm_``) rather than as a separate (..., out) sum, and in backward the adapter's
    input gradient goes into the base one the same way; with dropout, only the keep mask is saved
    and x ⊙ keep is recomputed in backward, where composed ops keep the dropped copy of x *and*
    the mask for every adapted Linear. No (out, in) tensor is ever formed (unless W itself trains).
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
            out = quant.base_linear(x2, weight, bias)  # (N, out); a plain weight goes to F.linear as it is
            narrow = narrow.to(out.dtype)
            out.addmm_(narrow, lora_B.to(out.dtype).t())
        ctx.quantized = weight if isinstance(weight, quant.QuantizedWeight) else None
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
                grad_x = quant.add_input_grad(grad_x, g, weight)
            grad_x = grad_x.to(x.dtype).view(x.shape)
        if need_A:
            dropped = x2 if multiplier is None else _apply_mask(x2, multiplier, into_keep=transient)
            grad_A = (g_narrow.t() @ dropped.to(dt)).to(lora_A.dtype)  # (r, in)
        if need_w:  # only when the base weight itself trains
            grad_w = (g.t() @ x2.to(dt)).to(weight.dtype)
        if need_b:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None


def rows_by_adapter(row_adapters: Sequence[Optional[str]], batch: int, device) -> list[tuple[Optional[str], torch.Tensor]]:
    """(adapter name or None, indices of its rows) for a mixed batch, names in first-seen order;
    every layer kind (LoRALinear, LoRAEmbedding, ModuleToSave) splits its batch with this."""
    if len(row_adapters) != batch:
        raise ValueError(f"mixed batch: {len(row_adapters)} adapter names for {batch} rows")
    return [(name, torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=device))
            for name in dict.fromkeys(row_adapters)]


class LoRAAdapter(nn.Module):
    """One adapter: ``delta(x) = dropout(x) @ lora_Aᵀ @ lora_Bᵀ · scaling``.

    Args:
        in_features / out_features: the wrapped Linear's sizes.
        r: rank; ``lora_A`` is (r, in_features), ``lora_B`` is (out_features, r).
        alpha: scaling numerator; scaling is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: probability; 0 gives ``nn.Identity`` so no dropout op runs at all.
        init: ``kaiming`` (PEFT's default: A Kaiming-uniform with a=sqrt(5)) or ``gaussian``
            (A ~ N(0, 1/r)); B starts at zero either way, so a new adapter changes nothing.
        dtype: the adapter's parameter dtype, float32 by default even under a bf16 base.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # forward multiplies by this tensor, not by the Python float: XLA compiles Python numbers (and
        # 0-dim tensors holding 0 or 1) into the graph as constants, so adapters differing only in
        # alpha would each compile their own graphs; a (1,)-shaped tensor is a graph input instead.
        # Not persistent, so the state-dict keys stay PEFT's.
        self.register_buffer("scale", torch.full((1,), self.scaling, device=device), persistent=False)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        # nn.Identity at 0: no dropout op runs. Otherwise nn.Dropout holds p (and follows
        # train/eval) but forward draws the mask itself and hands it to _LoRAFunction, so that
        # backward can re-apply the mask instead of keeping a dropped copy of x.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mask_site = next(_SITES)  # this adapter's own dropout_mask call (see dropout_mask)
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in x's dtype: the adapter term
        ``dropout(x) Aᵀ · scaling Bᵀ``, or with ``weight`` (and ``bias``) the whole
        ``x Wᵀ + b + dropout(x) Aᵀ · scaling Bᵀ`` in one autograd node (what LoRALinear runs).

        The weights are cast to x's dtype (a cheap r-wide cast; autograd still accumulates
        float32 gradients), and the scaling multiplies the narrow (..., r) intermediate rather
        than the (..., out) result. The out × in product B·A is never formed.
        """
        keep, scale = None, self.scale
        if self.training and isinstance(self.dropout, nn.Dropout):
            keep = dropout_mask(x, self.dropout.p, self.mask_site)
            scale = scale / (1.0 - self.dropout.p)  # inverted dropout's 1/(1-p), on the r-wide side
        return _LoRAFunction.apply(x, weight, bias, self.lora_A, self.lora_B, scale, keep)

    def delta_weight(self) -> torch.Tensor:
        """B·A·scaling as an (out_features, in_features) float32 tensor, for merging."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The (out, in) float32 weight with this adapter folded in: ``W + B·A·scaling``."""
        return weight.float() + self.delta_weight().to(weight.device)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of merged_weight, (out, in) float32."""
        return weight.float() - self.delta_weight().to(weight.device)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


_DORA_OVER_QUANTIZED = ("DoRA over a quantized base (minilora.quantize) is not supported: its magnitude needs the "
                        "weight's row norms in every forward; use plain LoRA over the quantized base, or DoRA over "
                        "the float one")


def init_adapter_slots(layer: nn.Module, base: nn.Module) -> None:
    """The adapter bookkeeping every adapted layer (LoRALinear, LoRAEmbedding) starts with."""
    layer.adapters = nn.ModuleDict()
    layer.active_adapter = None   # Optional[str]
    layer.merged_adapter = None   # Optional[str]
    layer.disabled = False
    # Per-row adapter names for a mixed batch (see minilora.inject.mixed_batch).
    layer.row_adapters = None     # Optional[Sequence[Optional[str]]]
    # A new nn.Module starts in training mode; inherit the replaced module's mode instead, or
    # adapter dropout would run inside a model the user had put in eval().
    layer.train(base.training)


class LoRALinear(nn.Module):
    """Replaces an ``nn.Linear``: the frozen base ``weight``/``bias`` (the very Parameter objects
    of the Linear it replaces, so state-dict keys do not change) plus named adapters. Over a
    ``quant.QuantLinear`` the ``weight`` is its QuantizedWeight, dequantized in each forward
    and backward; such a layer cannot ``merge()`` (see ``minilora.merge_and_unload``).

    Shapes: input (..., in_features) -> output (..., out_features), output dtype = input dtype.
    Only the active adapter contributes; ``merge()`` folds it into ``weight``.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, (nn.Linear, quant.QuantLinear)):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__} (or a QuantLinear, "
                            "which minilora.quantize puts in place of an nn.Linear)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        init_adapter_slots(self, base)
        self.stacked = None  # this layer's adapter stack while a mixed batch is served stacked (minilora.batched)

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", dtype: torch.dtype = torch.float32, use_dora: bool = False) -> LoRAAdapter:
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        if use_dora and self.quantized:
            raise quant.QuantizedBaseError(_DORA_OVER_QUANTIZED)
        if use_dora:
            from .dora import DoRAAdapter  # dora.py builds on this module, so it cannot be imported at the top
            adapter = DoRAAdapter(self.weight, r, alpha, dropout, use_rslora, init, dtype=dtype)
        else:
            adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora, init,
                                  dtype=dtype, device=self.weight.device)
        adapter.train(self.training)
        self.adapters[name] = adapter
        return adapter

    @property
    def lora_A(self) -> torch.Tensor:
        """The active adapter's A, (r, in_features)."""
        return self.adapters[self._require_active()].lora_A

    @property
    def lora_B(self) -> torch.Tensor:
        """The active adapter's B, (out_features, r)."""
        return self.adapters[self._require_active()].lora_B

    @property
    def scaling(self) -> float:
        return self.adapters[self._require_active()].scaling

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def _require_active(self) -> str:
        if self.active_adapter is None:
            raise ValueError("this LoRALinear has no active adapter")
        return self.active_adapter

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged_adapter is not None:
            return quant.linear(x, self.weight, self.bias)
        if self.stacked is not None and self.stacked.serves(self):  # all rows in one product: minilora.batched
            return self.stacked(x, self.weight, self.bias)
        if self.row_adapters is not None:
            out = quant.linear(x, self.weight, self.bias)
            return out + self._mixed_delta(x, out.shape).to(out.dtype)
        if self.active_adapter is None:
            return quant.linear(x, self.weight, self.bias)
        return self.adapters[self.active_adapter](x, self.weight, self.bias)

    def _mixed_delta(self, x: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
        """Each batch row (dim 0) through its own adapter, or none for ``None``."""
        delta = x.new_zeros(out_shape)
        for name, rows in rows_by_adapter(self.row_adapters, x.shape[0], x.device):
            if name is None or name not in self.adapters:
                continue  # the base model for these rows (or a layer this adapter does not target)
            delta.index_copy_(0, rows, self.adapters[name](x.index_select(0, rows)).to(delta.dtype))
        return delta

    # -- merging ------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Fold the active adapter into ``weight``; a no-op when already merged.

        The delta is formed in float32 and the sum cast back to the weight's dtype once.
        With ``safe=True`` a non-finite result raises and leaves ``weight`` untouched.
        """
        if self.merged_adapter is not None or self.active_adapter is None:
            return
        if self.quantized:
            raise quant.QuantizedBaseError(
                f"cannot merge adapter {self.active_adapter!r} into a {self.weight.scheme} base: the sum would "
                "have to be quantized again, losing most of the adapter; use minilora.merge_and_unload(model) "
                "for plain Linears in the compute dtype, or keep the adapter unmerged")
        merged = self.adapters[self.active_adapter].merged_weight(self.weight).to(self.weight.dtype)
        if safe and not torch.isfinite(merged).all():  # in the weight's dtype: fp16 overflows above 65504
            raise ValueError(
                f"merging adapter {self.active_adapter!r} gives non-finite weights; the adapter is "
                "likely diverged (check its training loss), so the layer was left unmerged"
            )
        self.weight.copy_(merged)
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter again; exact up to the weight dtype's rounding."""
        if self.merged_adapter is None:
            return
        restored = self.adapters[self.merged_adapter].unmerged_weight(self.weight)
        self.weight.copy_(restored.to(self.weight.dtype))
        self.merged_adapter = None

    @property
    def quantized(self) -> bool:
        """Whether the base weight is stored quantized (a quant.QuantizedWeight)."""
        return isinstance(self.weight, quant.QuantizedWeight)

    def to_linear(self) -> nn.Module:
        """A plain nn.Linear sharing this layer's weight and bias (merge first to keep the adapter);
        over a quantized base, the quant.QuantLinear it wrapped (same weight and bias objects)."""
        if self.quantized:
            return quant.QuantLinear(self.weight, self.bias).train(self.training)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.active_adapter!r}, merged={self.merged_adapter!r}")
