"""LoRA's dropout: ``drop(x) = x ⊙ keep / (1 - p)`` on an adapter's input, in training only.

Every LoRA and DoRA adapter holds one ``LoRADropout`` (``nn.Identity`` at p = 0), and every keep
mask is drawn by one op, ``minilora::dropout_mask``, from torch's generator: one random stream,
whichever path computes the adapter. The plain forward calls the module (``self.dropout(x)``);
the fused training forward (minilora/fused.py) asks for ``keep_mask(x)`` and applies the mask
itself, so that backward keeps the byte mask rather than the dropped copy of x.

The mask is bool (one byte an element), drawn by ``bernoulli_`` where torch has a vectorised kernel
for it and from random 64-bit words elsewhere (AMD CPUs): see ``_draw_keep_mask``.
"""

from __future__ import annotations

import functools
import itertools
import platform
from typing import Optional

import torch
from torch import nn


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
    if x.device.type != "cpu" or cpu_bernoulli_is_vectorised():
        return torch.empty_like(x, dtype=_mask_dtype(x)).bernoulli_(1.0 - p)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits random
    uniform = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-2¹⁵, 2¹⁵)
    return torch.ge(uniform, min(round(p * 2**16), 2**16 - 1) - 2**15)


@functools.lru_cache(maxsize=None)
def cpu_bernoulli_is_vectorised() -> bool:
    """ATen's own test for its MKL bernoulli_ kernel: built with MKL and running on an Intel CPU.
    The benchmark (minilora_bench.models.mask_path) and the tests replace it to run either CPU path."""
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


class LoRADropout(nn.Module):
    """Inverted dropout with probability ``p`` (0 < p < 1) on an adapter's input, (...) -> same
    shape and dtype: ``x ⊙ keep / (1 - p)`` in training, x itself in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.site = next(_SITES)  # this adapter's own dropout_mask call (see dropout_mask)

    def keep_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The keep mask for ``x`` (see dropout_mask), or None in eval mode: nothing is dropped."""
        return dropout_mask(x, self.p, self.site) if self.training else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep_mask(x)
        return x if keep is None else x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
