"""A frozen base weight kept in the block format of a GGUF file (ggml's quantization types), so a
model that llama.cpp or Ollama runs can be fine-tuned on its own quantized blocks: no
re-quantization, the frozen base is the model as shipped.

    weight = GGUFWeight(blocks, "Q4_1", in_features=576)   # blocks: (out, bytes per row) uint8, as in the file
    weight.dequantize(torch.bfloat16)                       # (out, in), computed in float32, rounded once

``GGUFWeight`` is a ``quant.QuantizedWeight``: QuantLinear, QuantEmbedding, LoRALinear and
LoRAEmbedding take it as they take an NF4 weight (dequantized one layer at a time, in forward
and again in backward), and ``.to(device)`` moves its buffers without casting them. Reading the
file is the app's job (minilora_train.gguf_base, with gguf-py); this module is plain torch, so
the same code runs eagerly on CPU and CUDA and is traced by XLA.

Each block's half-precision scales are split from its packed codes when the weight is made
(``d``, ``m``: (out, blocks) float16; ``codes``: (out, blocks, rest of the block) uint8): the
same bytes as the file, in tensors that need no bit casting on the device. Dequantization
repeats gguf-py's reference (``gguf.quants.dequantize``) operation by operation in float32, so
its result is equal to it bit for bit (tests/test_gguf_quant.py checks every type on random blocks).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .weight import QuantizedWeight

# name: (elements per block, bytes per block, the block's fields in file order). A field is
# (name, bytes); "d" and "m" are float16 scales, every "codes" run is packed integers, kept together.
# The layouts are ggml's (ggml-common.h: block_q4_0 … block_q6_K); QK_K = 256 for the K-quants.
BLOCK_LAYOUTS = {
    "Q4_0": (32, 18, (("d", 2), ("codes", 16))),
    "Q4_1": (32, 20, (("d", 2), ("m", 2), ("codes", 16))),
    "Q5_0": (32, 22, (("d", 2), ("codes", 20))),               # qh (4: bit 5 of each value), qs (16)
    "Q5_1": (32, 24, (("d", 2), ("m", 2), ("codes", 20))),
    "Q8_0": (32, 34, (("d", 2), ("codes", 32))),               # int8 values
    "Q4_K": (256, 144, (("d", 2), ("m", 2), ("codes", 140))),  # scales (12: 8 x 6-bit scale, min), qs (128)
    "Q5_K": (256, 176, (("d", 2), ("m", 2), ("codes", 172))),  # scales (12), qh (32), qs (128)
    "Q6_K": (256, 210, (("codes", 208), ("d", 2))),            # ql (128), qh (64), scales (16 int8)
}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
GGML_TYPES = tuple(FLOAT_TYPES) + tuple(BLOCK_LAYOUTS)


class UnsupportedGGMLTypeError(ValueError):
    """A tensor type GGUFWeight does not read (an i-quant such as IQ4_XS, Q2_K, Q3_K, TQ…)."""


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2, n): the low nibbles, then the high ones (ggml's order)."""
    return torch.stack((packed & 15, packed >> 4), dim=-2)


def _bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """(..., n) uint8 -> (..., 8 / width, n): the ``width``-bit fields from the lowest up."""
    mask = (1 << width) - 1
    return torch.stack([(packed >> shift) & mask for shift in range(0, 8, width)], dim=-2)


def _signed(u: torch.Tensor) -> torch.Tensor:
    """uint8 read as int8, as float32: an arithmetic, not a bit cast (which XLA may not trace)."""
    return ((u.to(torch.int16) ^ 128) - 128).to(torch.float32)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes (R, nb, 12) -> the 8 sub-block scales and mins (R, nb, 8), 6 bits
    each: bytes 0-3 hold scales 0-3 (and the high bits of 4-7), 4-7 the mins, 8-11 the low bits
    of scales and mins 4-7 (gguf-py's Q4_K.get_scale_min)."""
    d, m, m_d = packed.unflatten(-1, (3, 4)).unbind(-2)
    scales = torch.cat((d & 63, (m_d & 15) | ((d >> 2) & 48)), dim=-1)
    mins = torch.cat((m & 63, (m_d >> 4) | ((m >> 2) & 48)), dim=-1)
    return scales.float(), mins.float()


def dequantize_blocks(ggml_type: str, codes: torch.Tensor, d: torch.Tensor,
                      m: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Blocks of one type -> their values, (R, nb · block elements) float32. ``codes`` (R, nb,
    bytes), ``d`` and ``m`` (R, nb) float16, as GGUFWeight holds them. Each product and sum is the
    one gguf-py forms, in the same order, so the float32 results are its bits (in place where a
    fresh (R, in) temporary would only be thrown away)."""
    rows, nb = codes.shape[:2]
    d = d.float().unsqueeze(-1)  # (R, nb, 1)
    if ggml_type == "Q8_0":
        q = _signed(codes)
        return (q * d).view(rows, -1)
    if ggml_type in ("Q4_0", "Q4_1"):
        q = _nibbles(codes).view(rows, nb, 32).float()  # (R, nb, 32)
        return (d * q.sub_(8) if ggml_type == "Q4_0" else (d * q).add_(m.float().unsqueeze(-1))).view(rows, -1)
    if ggml_type in ("Q5_0", "Q5_1"):
        high = _bits(codes[..., :4], 1).transpose(-1, -2).reshape(rows, nb, 32)  # value j: bit j of qh
        q = (_nibbles(codes[..., 4:]).view(rows, nb, 32) | (high << 4)).float()
        return (d * q.sub_(16) if ggml_type == "Q5_0" else (d * q).add_(m.float().unsqueeze(-1))).view(rows, -1)
    if ggml_type in ("Q4_K", "Q5_K"):
        scales, mins = _k_scales(codes[..., :12])
        scale = (d * scales).unsqueeze(-1)  # (R, nb, 8, 1): one per 32 values
        offset = (m.float().unsqueeze(-1) * mins).unsqueeze(-1)
        low = _nibbles(codes[..., -128:].unflatten(-1, (4, 32))).reshape(rows, nb, 8, 32)
        if ggml_type == "Q5_K":  # sub-block s takes bit s of each of the 32 qh bytes
            low = low | (_bits(codes[..., 12:44], 1) << 4)
        return (scale * low.float()).sub_(offset).view(rows, -1)
    if ggml_type == "Q6_K":
        low = _nibbles(codes[..., :128].unflatten(-1, (2, 64))).reshape(rows, nb, 8, 32)
        high = _bits(codes[..., 128:192].unflatten(-1, (2, 32)), 2).reshape(rows, nb, 8, 32)
        q = (low | (high << 4)).float().sub_(32).view(rows, nb, 16, 16)
        scale = (d * _signed(codes[..., 192:208])).unsqueeze(-1)  # (R, nb, 16, 1)
        return (scale * q).view(rows, -1)
    raise UnsupportedGGMLTypeError(_unsupported(ggml_type))


def _unsupported(ggml_type: str) -> str:
    return (f"GGUF tensor type {ggml_type} is not supported as a frozen base; supported: {', '.join(GGML_TYPES)} "
            "(re-quantize the file with llama-quantize to one of them, e.g. Q4_K_M)")


class GGUFWeight(QuantizedWeight):
    """A frozen (out, in) weight in one of ggml's formats, ``dequantize()``-d on use.

    ``blocks``: (out, bytes per row) uint8, the tensor's rows as the GGUF file stores them (for
    F32, F16 and BF16 the raw values). ``dtype``: the compute dtype. A QuantizedWeight by type,
    so every layer that takes a quantized base takes it, but made from a file's blocks, not by
    quantizing: its ``scheme`` is the ggml type's name. Attributes: ``ggml_type``, ``shape``,
    ``dtype``, ``blocksize`` (elements per block; 1 for the float types).
    """

    def __init__(self, blocks: torch.Tensor, ggml_type: str, in_features: int, dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # QuantizedWeight.__init__ quantizes a float weight: not what happens here
        if ggml_type not in GGML_TYPES:
            raise UnsupportedGGMLTypeError(_unsupported(ggml_type))
        if blocks.dtype != torch.uint8 or blocks.dim() != 2:
            raise ValueError(f"GGUFWeight takes the raw (out, bytes per row) uint8 rows of a tensor, got a "
                             f"{blocks.dtype} tensor of shape {tuple(blocks.shape)}")
        self.ggml_type = self.scheme = ggml_type
        self.dtype = dtype
        self.double_quant = False
        out = blocks.shape[0]
        self.shape = torch.Size((out, in_features))
        blocks = blocks.contiguous()
        if ggml_type in FLOAT_TYPES:
            self.blocksize = 1
            values = blocks.view(FLOAT_TYPES[ggml_type])
            self._check_row_bytes(values.shape[1], in_features)
            self.register_buffer("codes", values)  # (out, in) in the file's float type
            return
        self.blocksize, type_size, fields = BLOCK_LAYOUTS[ggml_type]
        if in_features % self.blocksize:
            raise ValueError(f"a {ggml_type} row holds whole blocks of {self.blocksize} values; in_features="
                             f"{in_features} is not a multiple")
        nb = in_features // self.blocksize
        self._check_row_bytes(blocks.shape[1], nb * type_size)
        blocks = blocks.view(out, nb, type_size)
        start = 0
        for name, size in fields:
            part = blocks[..., start:start + size]
            start += size
            if name == "codes":
                self.register_buffer("codes", part.clone())  # (out, nb, bytes)
            else:  # a float16 scale: two bytes, little-endian as ggml writes them
                self.register_buffer(name, part.clone().view(torch.float16).view(out, nb))

    def _check_row_bytes(self, got: int, expected: int) -> None:
        if got != expected:
            raise ValueError(f"a {self.ggml_type} weight with {self.shape[1]} inputs has {expected} "
                             f"{'values' if self.ggml_type in FLOAT_TYPES else 'bytes'} a row, got {got}")

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (out, in) weight in ``dtype`` (default: the compute dtype), computed in float32 and
        rounded once. A new tensor every call (unless the file's float type is ``dtype`` already)."""
        return self.dequantize_rows(slice(None), dtype)

    def dequantize_rows(self, rows, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(R, in) rows of the weight in ``dtype`` (default: the compute dtype), equal bit for bit to
        ``dequantize()[rows]``: only those rows' blocks are read. ``rows``: a slice (a tile) or a
        (R,) integer tensor (an embedding lookup)."""
        dtype = dtype or self.dtype

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)

        if self.ggml_type in FLOAT_TYPES:
            values = take(self.codes)
            return values if values.dtype == dtype else values.float().to(dtype)
        m = take(self.m) if "m" in self._buffers else None
        return dequantize_blocks(self.ggml_type, take(self.codes), take(self.d), m).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.ggml_type}, shape={tuple(self.shape)}, dtype={self.dtype}"
