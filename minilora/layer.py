"""LoRALinear: a frozen nn.Linear plus named low-rank adapters, computed as x @ Aᵀ @ Bᵀ."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in x's dtype.

        The weights are cast to x's dtype (a cheap r-wide cast; autograd still accumulates
        float32 gradients), and the scaling multiplies the narrow (..., r) intermediate rather
        than the (..., out) result. The out × in product B·A is never formed.
        """
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        narrow = F.linear(self.dropout(x), a) * self.scale  # (..., r), scaled in float32
        return F.linear(narrow.to(x.dtype), b)

    def delta_weight(self) -> torch.Tensor:
        """B·A·scaling as an (out_features, in_features) float32 tensor, for merging."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


class LoRALinear(nn.Module):
    """Replaces an ``nn.Linear``: the frozen base ``weight``/``bias`` (the very Parameter objects
    of the Linear it replaces, so state-dict keys do not change) plus named adapters.

    Shapes: input (..., in_features) -> output (..., out_features), output dtype = input dtype.
    Only the active adapter contributes; ``merge()`` folds it into ``weight``.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.adapters = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.merged_adapter: Optional[str] = None
        self.disabled = False
        # Per-row adapter names for a mixed batch (see minilora.inject.mixed_batch).
        self.row_adapters: Optional[Sequence[Optional[str]]] = None
        # A new nn.Module starts in training mode; inherit the Linear's mode instead, or adapter
        # dropout would run inside a model the user had put in eval().
        self.train(base.training)

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", dtype: torch.dtype = torch.float32) -> LoRAAdapter:
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
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
        out = F.linear(x, self.weight, self.bias)
        if self.disabled or self.merged_adapter is not None:
            return out
        if self.row_adapters is not None:
            return out + self._mixed_delta(x, out.shape).to(out.dtype)
        if self.active_adapter is None:
            return out
        return out + self.adapters[self.active_adapter](x).to(out.dtype)

    def _mixed_delta(self, x: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
        """Each batch row (dim 0) through its own adapter, or none for ``None``."""
        if len(self.row_adapters) != x.shape[0]:
            raise ValueError(f"mixed batch: {len(self.row_adapters)} adapter names for {x.shape[0]} rows")
        delta = x.new_zeros(out_shape)
        for name in dict.fromkeys(self.row_adapters):
            if name is None or name not in self.adapters:
                continue  # the base model for these rows (or a layer this adapter does not target)
            rows = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=x.device)
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
        adapter = self.adapters[self.active_adapter]
        merged = self.weight.float() + adapter.delta_weight().to(self.weight.device)
        if safe and not torch.isfinite(merged).all():
            raise ValueError(
                f"merging adapter {self.active_adapter!r} gives non-finite weights; the adapter is "
                "likely diverged (check its training loss), so the layer was left unmerged"
            )
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter again; exact up to the weight dtype's rounding."""
        if self.merged_adapter is None:
            return
        adapter = self.adapters[self.merged_adapter]
        restored = self.weight.float() - adapter.delta_weight().to(self.weight.device)
        self.weight.copy_(restored.to(self.weight.dtype))
        self.merged_adapter = None

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's weight and bias (merge first to keep the adapter)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.active_adapter!r}, merged={self.merged_adapter!r}")
