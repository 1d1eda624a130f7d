"""The base weight a layer multiplies by: a plain tensor, or a frozen weight stored quantized.

``QuantizedWeight`` stores an (out, in) weight in 4 bits (NF4, as QLoRA) or 8 bits (int8 per row),
in plain torch ops, so the same code runs eagerly on CPU and CUDA and is traced by XLA. The ops
below (``linear``, ``embedding``, ``dense``, ``base_linear``, ``add_input_grad``) take a plain
tensor or any stored weight with QuantizedWeight's interface (``dequantize(dtype)``,
``dequantize_rows(rows, dtype)``, ``row_tiles()``, ``nbytes()``, ``in_features``,
``out_features``, ``device``) and never ask which scheme it is; ``QuantLinear`` and
``QuantEmbedding`` hold one in place of an nn.Linear or nn.Embedding. Nothing here knows of
adapters or models: ``minilora.quant`` puts these types into a model.

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

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("nf4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' choices
SCALE_BLOCK = 256  # double quantization's block of block scales (bitsandbytes and the paper)
# The most weight elements dequantized at once: a larger weight (a quantized LM head, an 8B MLP) is
# multiplied tile by tile, so that the float transient (6 bytes an element in bf16: float32 values and
# the compute-dtype copy) stays at one Llama-3.2-1B MLP projection's, 8192 x 2048 elements.
# docs/library.md says why this size.
TILE_ELEMENTS = 1 << 24

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
        check_scheme(scheme, blocksize)
        self.scheme, self.blocksize, self.double_quant = scheme, blocksize, double_quant and scheme == "nf4"
        self.shape = torch.Size(weight.shape)
        self.dtype = weight.dtype
        # Quantized a part at a time (row tiles for int8, runs of TILE_ELEMENTS elements, whole
        # blocks, for NF4), so that the float32 working copy of a large table (a 1B model's
        # embedding: 1 GB) is one tile's. Blocks are independent: the result is the same bits.
        w = weight.detach()
        if scheme == "int8":
            codes, absmaxes = [], []
            for rows in self.row_tiles():
                part = w[rows].float()
                absmax = part.abs().amax(dim=1)  # (rows,)
                codes.append(torch.round(part * (127.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-127, 127)
                             .to(torch.int8))
                absmaxes.append(absmax)
            self.register_buffer("codes", torch.cat(codes))  # (out, in)
            self.register_buffer("absmax", torch.cat(absmaxes))  # (out,)
            return
        code = torch.tensor(NF4_CODE, device=w.device)
        flat, n = w.reshape(-1), w.numel()
        codes, absmaxes = [], []
        for start in range(0, n, TILE_ELEMENTS):  # a multiple of every block size, and even
            part = flat[start:start + TILE_ELEMENTS]
            q, absmax = _blockwise(part.float(), code, blocksize)
            q8 = q[:part.numel() + part.numel() % 2].to(torch.uint8)  # an odd n pads with the code of 0, as bitsandbytes
            codes.append((q8[0::2] << 4) | q8[1::2])
            absmaxes.append(absmax)
        self.register_buffer("codes", torch.cat(codes))  # ((n + 1) // 2,)
        absmax = torch.cat(absmaxes)  # (blocks,)
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
        # (2 · bytes,) float32; index_select, the faster gather on the CPU (and a gather on XLA)
        values = self.pair_code.index_select(0, self.codes.to(torch.int32)).view(-1)
        return _expand_blocks(values, self.block_absmax(), n, self.blocksize).view(self.shape).to(dtype)

    def dequantize_rows(self, rows, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(R, in) rows of the weight in ``dtype`` (default: the compute dtype), equal bit for bit to
        ``dequantize()[rows]`` but reading and converting only those rows' codes and block scales.
        ``rows``: a (R,) integer tensor of row indices (an embedding lookup), or a slice (a tile)."""
        dtype = dtype or self.dtype
        out, in_ = self.shape
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(out)
            index = torch.arange(start, stop, device=self.device)
        else:
            index = rows
        if self.scheme == "int8":
            return (_take(self.codes, rows).float() * (_take(self.absmax, rows) / 127.0).unsqueeze(1)).to(dtype)
        per_row = in_ // self.blocksize
        if in_ % self.blocksize == 0:  # each row is whole blocks (and whole bytes): gather them
            codes = _take(self.codes.view(out, in_ // 2), rows)  # (R, in / 2)
            values = self.pair_code.index_select(0, codes.reshape(-1).to(torch.int32))  # (R · in / 2, 2)
            blocks = index.unsqueeze(1) * per_row + torch.arange(per_row, device=self.device)  # (R, in / bs)
            scaled = values.view(-1, per_row, self.blocksize).mul_(self._block_scales(blocks).unsqueeze(2))  # in place
            return scaled.view(-1, in_).to(dtype)
        # Rows that start inside a block: look each element up by its flat index (an (R, in) index;
        # hidden sizes that are multiples of the block size never come here).
        flat = index.unsqueeze(1) * in_ + torch.arange(in_, device=self.device)  # (R, in)
        byte = self.codes.index_select(0, (flat // 2).reshape(-1)).view(flat.shape).to(torch.int32)
        nibble = torch.where(flat % 2 == 0, byte >> 4, byte & 15)  # the first element is the high nibble
        values = self.pair_code[:16, 1].index_select(0, nibble.reshape(-1)).view(flat.shape)
        return (values * self._block_scales(flat // self.blocksize)).to(dtype)

    def _block_scales(self, blocks: torch.Tensor) -> torch.Tensor:
        """The scales of the blocks numbered ``blocks`` (any shape, integer), float32, computed as
        ``block_absmax()`` computes them (the same float32 operations, so the same bits)."""
        if not self.double_quant:
            return self.absmax[blocks]
        codes = self.absmax[blocks].to(torch.int32)
        return self.scale_code[codes] * self.absmax_scale[blocks // SCALE_BLOCK] + self.absmax_offset

    def row_tiles(self) -> list[slice]:
        """Row ranges of about equal size, each of at most TILE_ELEMENTS elements (one range for
        every weight up to that size): what a product with this weight dequantizes at a time."""
        out, in_ = self.shape
        tiles = max(1, math.ceil(out * in_ / TILE_ELEMENTS))
        rows = math.ceil(out / tiles)
        return [slice(start, min(start + rows, out)) for start in range(0, out, rows)]

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


def _take(t: torch.Tensor, rows) -> torch.Tensor:
    """Rows of ``t`` along its first axis: a view for a slice, a gather for an index tensor."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def check_scheme(scheme: str, blocksize: int) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize} is not one of {', '.join(map(str, BLOCKSIZES))} "
                         "(bitsandbytes' block sizes; QLoRA uses 64)")


# -- ops over a plain or a stored weight ------------------------------------------------------------

def is_quantized(weight) -> bool:
    """Whether ``weight`` is stored (a QuantizedWeight, or any type with its interface) rather than
    a plain tensor: the one question the ops below and the adapted layers ask of a weight."""
    return not isinstance(weight, torch.Tensor)


def base_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x Wᵀ + b`` with no autograd of its own: (..., in) -> (..., out). A plain weight tensor goes
    to F.linear as it is (autocast, if on, casts as it does for nn.Linear); a stored weight is
    dequantized to x's dtype, whole or, above TILE_ELEMENTS, one row tile at a time."""
    if not is_quantized(weight):
        return F.linear(x, weight, bias)
    tiles = weight.row_tiles()
    if len(tiles) == 1:
        return F.linear(x, weight.dequantize(x.dtype), bias)
    out = torch.cat([F.linear(x, weight.dequantize_rows(rows, x.dtype)) for rows in tiles], dim=-1)
    return out if bias is None else out + bias.to(out.dtype)


def add_input_grad(grad_x: Optional[torch.Tensor], grad: torch.Tensor, weight) -> torch.Tensor:
    """``grad_x + grad W`` (grad_x None: ``grad W``), in grad's dtype, added in place into grad_x:
    grad (N, out), W (out, in), grad_x (N, in). A plain weight is cast to grad's dtype if it differs
    (backward runs outside the forward's autocast, so it does the cast autocast did there); a
    stored weight is dequantized, tile by tile as in base_linear."""
    if not is_quantized(weight):
        parts = [(grad, weight.to(grad.dtype))]
    else:
        tiles = weight.row_tiles()
        parts = ([(grad, weight.dequantize(grad.dtype))] if len(tiles) == 1 else
                 ((grad[:, rows], weight.dequantize_rows(rows, grad.dtype)) for rows in tiles))
    for g, w in parts:
        grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
    return grad_x


class _DequantLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with W dequantized in forward and again in backward: only the quantized
    weight is kept between them, never the (out, in) float copy. Shapes: x (..., in), b (out,)."""

    @staticmethod
    def forward(ctx, x, bias, weight):
        ctx.weight = weight  # a module of buffers that never change: nothing to save
        ctx.bias_dtype = None if bias is None else bias.dtype
        return base_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_b = None
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if ctx.needs_input_grad[0]:
            grad_x = add_input_grad(None, g, ctx.weight).view(*grad.shape[:-1], -1)  # (..., in)
        if ctx.needs_input_grad[1]:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_b, None


def linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` for a plain weight tensor or a stored one: (..., in) -> (..., out)."""
    if is_quantized(weight):
        return _DequantLinear.apply(x, bias, weight)
    return F.linear(x, weight, bias)


def embedding(ids: torch.Tensor, weight, padding_idx: Optional[int] = None) -> torch.Tensor:
    """``F.embedding`` for a plain table or a QuantizedWeight (vocab, dim): (...) integer ids ->
    (..., dim). A quantized table dequantizes the looked-up rows only, to its compute dtype (what
    an nn.Embedding returns: its weight's dtype); it never trains, so there is no gradient to it."""
    if not is_quantized(weight):
        return F.embedding(ids, weight, padding_idx)
    return weight.dequantize_rows(ids.reshape(-1)).view(*ids.shape, weight.in_features)


def dense(weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A plain weight tensor as it is (cast to ``dtype`` if given), a stored weight dequantized."""
    if is_quantized(weight):
        return weight.dequantize(dtype)
    return weight if dtype is None else weight.to(dtype)


class QuantLinear(nn.Module):
    """What ``quantize`` puts in place of an nn.Linear: the frozen stored ``weight`` (a
    QuantizedWeight, or any type with its interface) and the Linear's own ``bias`` Parameter.
    (..., in_features) -> (..., out_features) in x's dtype. ``inject`` wraps it in a LoRALinear
    like any Linear."""

    def __init__(self, weight, bias: Optional[nn.Parameter] = None):
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

    def to_linear(self, weight: Optional[nn.Parameter] = None) -> nn.Linear:
        """A plain nn.Linear holding ``weight`` (default: this weight dequantized into the compute
        dtype, frozen) and this bias."""
        linear_ = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear_.weight = weight if weight is not None else as_parameter(self.weight)
        linear_.bias = self.bias
        return linear_.train(self.training)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """What ``quantize(..., embeddings=True)`` puts in place of an nn.Embedding: the frozen
    stored table ``weight`` (num_embeddings, embedding_dim). ids (...) -> (..., embedding_dim)
    in the compute dtype; a lookup dequantizes the rows it gathers, never the table. An output
    head tied to the table holds the same QuantizedWeight (one copy, not two)."""

    def __init__(self, weight, padding_idx: Optional[int] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features
        self.padding_idx = padding_idx  # only what an nn.Embedding does with it on the forward side: nothing
        self.weight = weight

    @classmethod
    def from_embedding(cls, base: nn.Embedding, scheme: str = "nf4", blocksize: int = 64,
                       double_quant: bool = True) -> "QuantEmbedding":
        return cls(QuantizedWeight(base.weight, scheme, blocksize, double_quant), base.padding_idx).train(base.training)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding(ids, self.weight, self.padding_idx)

    def to_embedding(self, weight: Optional[nn.Parameter] = None) -> nn.Embedding:
        """A plain nn.Embedding holding ``weight`` (default: this table dequantized into the compute
        dtype, frozen)."""
        table = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        table.weight = weight if weight is not None else as_parameter(self.weight)
        return table.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}" + (
            f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


class QuantizedBaseError(ValueError):
    """What a quantized base cannot do, raised before anything changes: merging an adapter into
    quantized weights, DoRA over them, training a quantized module in full (modules_to_save), or
    quantizing a module that one of those already holds. The message says what to do instead."""


def as_parameter(weight) -> nn.Parameter:
    """A stored weight dequantized into a frozen Parameter in its compute dtype."""
    return nn.Parameter(weight.dequantize(), requires_grad=False)
