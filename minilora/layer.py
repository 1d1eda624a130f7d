"""LoRALinear: a frozen nn.Linear plus named low-rank adapters, each computing

    y = base(x) + B(A(drop(x))) * scale

(LoRAAdapter.forward). Variants such as DoRA (minilora/dora.py) are LoRAAdapter subclasses that a
caller hands to ``add_adapter``; this module knows none of them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import LoRADropout
from .fused import lora_linear
from .weight import QuantizedBaseError, QuantLinear, is_quantized, linear


def rows_by_adapter(row_adapters: Sequence[Optional[str]], batch: int, device) -> list[tuple[Optional[str], torch.Tensor]]:
    """(adapter name or None, indices of its rows) for a mixed batch, names in first-seen order;
    every layer kind (LoRALinear, LoRAEmbedding, ModuleToSave) splits its batch with this."""
    if len(row_adapters) != batch:
        raise ValueError(f"mixed batch: {len(row_adapters)} adapter names for {batch} rows")
    return [(name, torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=device))
            for name in dict.fromkeys(row_adapters)]


class LoRAAdapter(nn.Module):
    """One adapter: ``B(A(drop(x))) * scale`` added to the base output (see forward).

    Args:
        in_features / out_features: the wrapped Linear's sizes.
        r: rank; ``lora_A`` is (r, in_features), ``lora_B`` is (out_features, r).
        alpha: scaling numerator; scaling is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: probability p of LoRADropout on the adapter's input; 0 gives ``nn.Identity``, so no
            dropout op runs at all.
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
        self.dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(..., in_features) -> (..., out_features):

            y = base(x) + B(A(drop(x))) * scale,    base(x) = x Wᵀ + b

        ``weight`` (out, in) and ``bias`` (out,) are the layer's (a plain weight or a stored one,
        minilora.weight); without ``weight`` the adapter term alone is returned (what a mixed batch
        adds row by row). A and B are cast to x's dtype (an r-wide cast; autograd still accumulates
        float32 gradients); the output has the base output's dtype. B·A is never formed.
        """
        if not torch.is_grad_enabled():  # the formula as written
            A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
            lora = F.linear(F.linear(self.dropout(x), A), B) * self.scale  # B(A(drop(x))) * scale
            if weight is None:
                return lora.to(x.dtype)
            base = linear(x, weight, bias)  # base(x)
            return base + lora.to(base.dtype)
        # With autograd recording (training), the same sum as one autograd node, which keeps the
        # byte dropout mask for backward instead of drop(x): minilora/fused.py says why.
        return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scale, self.dropout)

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


def init_adapter_slots(layer: nn.Module, base: nn.Module) -> None:
    """The adapter bookkeeping every adapted layer (LoRALinear, LoRAEmbedding) starts with."""
    layer.adapters = nn.ModuleDict()
    layer.active_adapter = None   # Optional[str]
    layer.merged_adapter = None   # Optional[str]
    layer.disabled = False
    # Per-row adapter names for a mixed batch (see minilora.adapters.mixed_batch).
    layer.row_adapters = None     # Optional[Sequence[Optional[str]]]
    # A new nn.Module starts in training mode; inherit the replaced module's mode instead, or
    # adapter dropout would run inside a model the user had put in eval().
    layer.train(base.training)


class LoRALinear(nn.Module):
    """Replaces an ``nn.Linear``: the frozen base ``weight``/``bias`` (the very Parameter objects
    of the Linear it replaces, so state-dict keys do not change) plus named adapters. Over a
    ``QuantLinear`` the ``weight`` is its stored weight (minilora.weight), dequantized in each forward
    and backward; such a layer cannot ``merge()`` (see ``minilora.merge_and_unload``).

    Shapes: input (..., in_features) -> output (..., out_features), output dtype = input dtype.
    Only the active adapter contributes; ``merge()`` folds it into ``weight``.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__} (or a QuantLinear, "
                            "which minilora.quantize puts in place of an nn.Linear)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        init_adapter_slots(self, base)
        self.stacked = None  # this layer's adapter stack while a mixed batch is served stacked (minilora.batched)

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", dtype: torch.dtype = torch.float32,
                    variant: Optional[type] = None) -> LoRAAdapter:
        """Add adapter ``name`` (inactive until selected): a LoRAAdapter, or a ``variant`` of it built
        from this layer's base weight as ``variant(weight, r, alpha, dropout, use_rslora, init,
        dtype=dtype)``, such as minilora.dora.DoRAAdapter, which inject passes for use_dora=True."""
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        if variant is None:
            adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora, init,
                                  dtype=dtype, device=self.weight.device)
        else:
            adapter = variant(self.weight, r, alpha, dropout, use_rslora, init, dtype=dtype)
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
            return linear(x, self.weight, self.bias)
        if self.stacked is not None and self.stacked.serves(self):  # all rows in one product: minilora.batched
            return self.stacked(x, self.weight, self.bias)
        if self.row_adapters is not None:
            out = linear(x, self.weight, self.bias)
            return out + self._mixed_delta(x, out.shape).to(out.dtype)
        if self.active_adapter is None:
            return linear(x, self.weight, self.bias)
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
            raise QuantizedBaseError(
                f"cannot merge adapter {self.active_adapter!r} into a quantized base: the sum would "
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
        """Whether the base weight is stored quantized (minilora.weight), not a plain tensor."""
        return is_quantized(self.weight)

    def to_linear(self) -> nn.Module:
        """A plain nn.Linear sharing this layer's weight and bias (merge first to keep the adapter);
        over a quantized base, the QuantLinear it wrapped (same weight and bias objects)."""
        if self.quantized:
            return QuantLinear(self.weight, self.bias).train(self.training)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.active_adapter!r}, merged={self.merged_adapter!r}")
