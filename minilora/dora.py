"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024), computed as PEFT's ``use_dora=True``.

The adapted weight is split into a direction and a trained magnitude per output feature:

    W' = (m / n) ⊙ (W0 + s·BA),   n = ||W0 + s·BA|| over the input dimension, one per output row
    out = (m / n) ⊙ (W0 x + s·B A x) + b

``m`` (``lora_magnitude_vector``, shape (out,)) starts at ||W0 + s·BA|| = ||W0|| (B starts at zero),
so a new DoRA adapter changes nothing. ``n`` is recomputed from the current B·A on every forward
but carries no gradient: the paper's section 4.3 treats it as a constant, which saves the memory of
differentiating through an (out, in) norm. A and B learn the direction, ``m`` the length.

With dropout active (training, p > 0), PEFT rescales only the dropped input's share, and so does
this module, so an adapter trains here as it would there:

    out = W0 x + b + (m/n − 1) ⊙ W0 d + (m/n) ⊙ s·B A d,   d = drop(x)

``drop`` is the adapter's LoRADropout, the same dropout (and random stream) as plain LoRA's.

DoRAAdapter is a variant of LoRAAdapter that the layer is given, not one it knows:
``LoRALinear.add_adapter(name, ..., variant=DoRAAdapter)``, as inject does for ``use_dora=True``.

On disk (PEFT's format): ``base_model.model.<module>.lora_magnitude_vector`` (out,) beside the
module's lora_A/lora_B, and ``"use_dora": true`` in adapter_config.json.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import LoRADropout
from .fused import lora_linear
from .layer import LoRAAdapter
from .weight import QuantizedBaseError, is_quantized


def check_base(weight) -> None:
    """Raise QuantizedBaseError if ``weight`` is stored quantized: DoRA's magnitude needs the
    weight's row norms in every forward."""
    if is_quantized(weight):
        raise QuantizedBaseError("DoRA over a quantized base (minilora.quantize) is not supported: its magnitude "
                                 "needs the weight's row norms in every forward; use plain LoRA over the quantized "
                                 "base, or DoRA over the float one")


class DoRAAdapter(LoRAAdapter):
    """A LoRA adapter plus ``lora_magnitude_vector``, (out_features,), in the adapter's dtype.

    Args:
        base_weight: the (out_features, in_features) weight of the Linear being adapted; the
            magnitude starts as its row norm. Not kept: forward is handed the weight each call.
        r, alpha, dropout, use_rslora, init, dtype: as for LoRAAdapter.
    """

    def __init__(self, base_weight: torch.Tensor, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", dtype: torch.dtype = torch.float32):
        check_base(base_weight)
        out_features, in_features = base_weight.shape
        super().__init__(in_features, out_features, r, alpha, dropout, use_rslora, init, dtype=dtype,
                         device=base_weight.device)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(base_weight).to(dtype))
        # The row norm of W0 + s·BA at merge time: unmerging needs it, and the merged weight alone
        # does not determine it (its row norms are |m|, whatever n was).
        self._merged_norm: Optional[torch.Tensor] = None
        self._lost_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (indices, W's rows) merging destroyed

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s·B·A||`` over the input dimension: (out_features,) float32, never differentiated.

        In float32 whatever the base dtype (PEFT takes it in the input's dtype: the same up to
        rounding for float32 models, and more accurate for bf16 ones).
        """
        combined = torch.addmm(weight.float(), self.lora_B.float() * self.scale, self.lora_A.float())  # (out, in)
        return torch.linalg.vector_norm(combined, dim=1)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) in x's dtype: the whole DoRA layer (module doc).

        Without dropout it is LoRA's own forward (``W0 x + s·BAx``) times the per-feature ``m/n``;
        with dropout the base GEMM runs a second time on the dropped input, as PEFT does. The norm
        forms B·A once per call, without gradient, and frees it.
        """
        if weight is None:
            raise ValueError("a DoRA adapter rescales the base layer's whole output, so it has no term of its own "
                             "to add to it: run it through its LoRALinear (mixed batches cannot use DoRA adapters)")
        ratio = self.ratio(self.weight_norm(weight)).to(x.dtype)  # (out,): m/n
        if self.training and isinstance(self.dropout, LoRADropout):
            dropped = self.dropout(x)  # d = drop(x): LoRA's dropout
            base_of_dropped = F.linear(dropped, weight)  # W0 d
            lora = lora_linear(dropped, None, None, self.lora_A, self.lora_B, self.scale)  # s·BAd (d is dropped already)
            # = W0 x + b + (m/n − 1) ⊙ W0 d + (m/n) ⊙ s·BAd, arranged so that backward keeps one
            # (..., out) tensor for m's gradient (W0 d + s·BAd) instead of two
            return F.linear(x, weight, bias) - base_of_dropped + ratio * (base_of_dropped + lora)
        out = super().forward(x, weight) * ratio  # (W0 x + s·BAx) ⊙ m/n: LoRA's forward, its dropout off here
        return out if bias is None else out + bias

    def ratio(self, norm: torch.Tensor) -> torch.Tensor:
        """(out,) float32 ``m / n`` for the row norms ``norm`` of W + s·BA, and 1 where a row is all
        zeros (n = 0): such a row computes 0 whatever it is scaled by, and 0/0 would make it NaN (a
        base Linear with a zero row, whose fresh magnitude is 0 too). The zero rows are kept out of
        the division, so m's gradient there is 0, not NaN."""
        zero = norm == 0
        return torch.where(zero, 1.0, self.lora_magnitude_vector.float() / torch.where(zero, 1.0, norm))

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) float32 ``(m/n) ⊙ (W + s·BA)``, the weight whose plain forward equals DoRA's.

        Remembers what unmerged_weight needs: n, the row norm before rescaling (the merged weight's
        row norms are |m|, whatever n was), and W's rows that the rescaling destroys in W's dtype,
        so that unmerging gives them back bit for bit rather than dividing by 0: rows where m is 0
        (the merged row is all zeros), or where a value overflows or sinks below the dtype's normal
        range. Usually there are none."""
        combined = super().merged_weight(weight)
        self._merged_norm = torch.linalg.vector_norm(combined, dim=1)
        ratio = self.ratio(self._merged_norm)
        merged = ratio.unsqueeze(1) * combined
        stored = merged.to(weight.dtype).abs()
        lost = (ratio == 0) | ((stored < torch.finfo(weight.dtype).tiny) & (combined != 0)).any(dim=1) \
            | ~stored.isfinite().all(dim=1)
        rows = lost.nonzero().squeeze(1)
        self._lost_rows = (rows, weight.detach()[rows].clone())
        return merged

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) float32 ``W' / (m/n) − s·BA``: the base weight back from a merged one (the rows
        merging destroyed from the copy merged_weight kept)."""
        if self._merged_norm is None:
            raise ValueError("this DoRA adapter was not merged into the weight, so there is nothing to unmerge")
        ratio = self.ratio(self._merged_norm)
        rows, kept = self._lost_rows
        ratio[rows] = 1.0  # those rows come from the copy; keep the division finite
        restored = super().unmerged_weight(weight.float() / ratio.unsqueeze(1))
        restored[rows] = kept.float()
        self._merged_norm = self._lost_rows = None
        return restored

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
