"""LoRAEmbedding: a frozen nn.Embedding plus named low-rank adapters, in PEFT's layout.

PEFT's Embedding layer, which this matches value for value: ``lora_embedding_A`` is
(r, num_embeddings), ``lora_embedding_B`` is (embedding_dim, r), and the adapter adds
``F.embedding(ids, Aᵀ) @ Bᵀ · scaling``; A starts at zero and B ~ N(0, 1), so a new adapter changes
nothing. No dropout: the input is token ids, and PEFT applies none to embeddings either.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoRAAdapter, init_adapter_slots, rows_by_adapter
from .weight import QuantEmbedding, QuantizedBaseError, embedding, is_quantized


class LoRAEmbedding(nn.Module):
    """Replaces an ``nn.Embedding``: its own ``weight`` Parameter (the same object, so state-dict
    keys do not change) and its lookup options, plus named adapters.

    Shapes: ids (...) integer -> (..., embedding_dim) in the weight's dtype. Each adapter is a
    LoRAAdapter with in_features = num_embeddings and out_features = embedding_dim, so its
    ``lora_A`` (r, num_embeddings) and ``lora_B`` (embedding_dim, r) have PEFT's shapes.
    """

    # The names PEFT gives these tensors on disk (no ".weight": PEFT holds them in a ParameterDict).
    PEFT_NAMES = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base: nn.Module):
        super().__init__()
        if type(base) not in (nn.Embedding, QuantEmbedding):
            # A subclass may change the lookup (Gemma scales its embeddings) in ways the adapter
            # term would have to follow; refuse rather than silently drop that.
            raise TypeError(f"LoRAEmbedding wraps nn.Embedding itself (or the QuantEmbedding minilora.quantize puts "
                            f"in its place), got {type(base).__name__}; leave this module out of target_modules")
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.weight = base.weight
        self.padding_idx = base.padding_idx
        # A quantized table has only the defaults (quantize refuses max_norm, the rest acts on gradients)
        self.max_norm, self.norm_type = getattr(base, "max_norm", None), getattr(base, "norm_type", 2.0)
        self.scale_grad_by_freq, self.sparse = getattr(base, "scale_grad_by_freq", False), getattr(base, "sparse", False)
        init_adapter_slots(self, base)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", dtype: torch.dtype = torch.float32) -> LoRAAdapter:
        """``dropout`` and ``init`` are taken for the signature LoRALinear shares and not used:
        embeddings get no dropout and PEFT's embedding initialisation whatever ``init`` says."""
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        adapter = LoRAAdapter(self.num_embeddings, self.embedding_dim, r, alpha, 0.0, use_rslora,
                              dtype=dtype, device=self.weight.device)
        with torch.no_grad():
            adapter.lora_A.zero_()
            adapter.lora_B.normal_()
        adapter.train(self.training)
        self.adapters[name] = adapter
        return adapter

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under the key endings PEFT writes for them."""
        adapter = self.adapters[name]
        return dict(zip(self.PEFT_NAMES, (adapter.lora_A, adapter.lora_B)))

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    # -- forward ------------------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        """Whether the table is stored quantized (minilora.weight), not a plain tensor."""
        return is_quantized(self.weight)

    def _lookup(self, ids: torch.Tensor, table) -> torch.Tensor:
        if is_quantized(table):  # the looked-up rows dequantized, never the table
            return embedding(ids, table, self.padding_idx)
        return F.embedding(ids, table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def delta(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        """(...) ids -> (..., embedding_dim): adapter ``name``'s term, F.embedding(ids, Aᵀ) Bᵀ · scaling,
        in the adapter's dtype. Only the r-wide rows of Aᵀ are gathered; B·A is never formed."""
        adapter = self.adapters[name]
        return (self._lookup(ids, adapter.lora_A.t()) @ adapter.lora_B.t()) * adapter.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._lookup(ids, self.weight)
        if self.disabled or self.merged_adapter is not None:
            return out
        if self.row_adapters is not None:
            delta = torch.zeros_like(out)
            for name, rows in rows_by_adapter(self.row_adapters, ids.shape[0], ids.device):
                if name is not None and name in self.adapters:
                    delta.index_copy_(0, rows, self.delta(ids.index_select(0, rows), name).to(out.dtype))
            return out + delta
        if self.active_adapter is None:
            return out
        return out + self.delta(ids, self.active_adapter).to(out.dtype)

    # -- merging ------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Fold the active adapter into ``weight`` (idempotent); the delta (num_embeddings,
        embedding_dim) is formed in float32 and the sum cast to the weight's dtype once."""
        if self.merged_adapter is not None or self.active_adapter is None:
            return
        if self.quantized:
            raise QuantizedBaseError(
                f"cannot merge adapter {self.active_adapter!r} into a quantized table: the sum would have to "
                "be quantized again, losing most of the adapter; use minilora.merge_and_unload(model) for a plain "
                "nn.Embedding in the compute dtype, or keep the adapter unmerged")
        merged = self.weight.float() + self.delta_weight(self.active_adapter)
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {self.active_adapter!r} gives non-finite weights; the adapter is "
                             "likely diverged (check its training loss), so the layer was left unmerged")
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        restored = self.weight.float() - self.delta_weight(self.merged_adapter)
        self.weight.copy_(restored.to(self.weight.dtype))
        self.merged_adapter = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """(num_embeddings, embedding_dim) float32: (B·A·scaling)ᵀ, on the weight's device."""
        return self.adapters[name].delta_weight().t().to(self.weight.device)

    def to_embedding(self) -> nn.Module:
        """A plain nn.Embedding sharing this layer's weight (merge first to keep the adapter); over a
        quantized table, the QuantEmbedding it wrapped (the same stored weight)."""
        if self.quantized:
            return QuantEmbedding(self.weight, self.padding_idx).train(self.training)
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm,
                                 self.norm_type, self.scale_grad_by_freq, self.sparse, device="meta")
        embedding.weight = self.weight
        return embedding.train(self.training)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"active={self.active_adapter!r}, merged={self.merged_adapter!r}")
