"""A GGUF file as the frozen base, kept in its own quantized blocks (``--quantize gguf``).

base_model.py converts a ``.gguf`` into a float transformers folder. This module instead builds
the transformers model around the file's tensors as they are: every Linear and the token
embedding hold a ``minilora.gguf_quant.GGUFWeight`` (the file's codes and scales, dequantized one
layer at a time), the norms are the file's float32 vectors. The numbers are the converted
folder's (gguf-py dequantizes the same blocks into it), in about the memory of the file.

llama.cpp's converter (convert_hf_to_gguf.py, ``LlamaModel.permute``) reorders the rows of q_proj
and k_proj of a "llama" file for its RoPE kernel, and transformers' GGUF loader puts them back;
rows are whole blocks, so here the blocks' rows are put back (``rope_rows``), exactly. The export
(gguf_export.py) applies the same order to an adapter's lora_B.

The file's header is read here directly: gguf-py's GGUFReader decodes every string of the
tokenizer's vocabulary through numpy views, which is slow for a vocabulary of SmolLM2's size
(docs/benchmarks.md, "Start-up: the demo's GGUF base"). The config and tokenizer that
transformers derives from the file (the slow part) are kept under
``~/.cache/minilora/gguf/<file>-<hash>.blocks/``, or taken from the converted folder when
base_model.py already made one.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .base_model import BaseModelError, converted_dir, is_converted, publish_folder

ROPE_PERMUTED = ("llama",)  # GGUF architectures whose q/k rows convert_hf_to_gguf.py permutes
SUPPORTED_ARCHITECTURES = ("llama",)  # what this loader and the export are tested on (SmolLM2, tiny Llamas)
INDEX_NAME = "minilora-gguf-blocks.json"  # written last into a cache folder: its presence means complete


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF file: ``shape`` in torch order (rows, then the values of a row),
    ``offset`` from the start of the file, ``nbytes`` as stored."""

    ggml_type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's scalar metadata (arrays are left out: the tokenizer's), tensor table (in file
    order), format version, and where each metadata entry's bytes are (a rewrite copies them)."""

    path: Path
    metadata: dict
    tensors: dict[str, TensorEntry]
    version: int
    kv_spans: dict[str, tuple[int, int]]

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def get(self, key: str, default=None):
        """An architecture's key without its prefix: ``get("attention.head_count")``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_header(path: os.PathLike) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file (format: ggml's docs/gguf.md), tensor data
    untouched. Raises BaseModelError for a file that is not GGUF v2 or v3."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        try:
            return _parse_header(path, blob)
        except (struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
            raise BaseModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); give a .gguf "
                                 "model file as llama.cpp writes it") from None


def _parse_header(path: Path, blob) -> GGUFHeader:
    import gguf

    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, blob, pos)
        pos += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal pos
        size = take("<Q")
        pos += size
        return bytes(blob[pos - size:pos]).decode("utf-8")

    def value(kind: int):
        nonlocal pos
        if kind == _STRING:
            return string()
        if kind != _ARRAY:
            return take(_SCALARS[kind])
        inner, count = take("<I"), take("<Q")
        if inner in _SCALARS:  # skipped over whole: nothing here needs a numeric array
            pos += count * struct.calcsize(_SCALARS[inner])
        else:
            for _ in range(count):
                value(inner)
        return None

    if bytes(blob[:4]) != b"GGUF":
        raise ValueError("no GGUF magic at the start")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}, expected 2 or 3")
    n_tensors, n_kv = take("<Q"), take("<Q")
    metadata, spans = {}, {}
    for _ in range(n_kv):
        start = pos
        key = string()
        metadata[key] = value(take("<I"))
        spans[key] = (start, pos)
    table = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        table.append((name, tuple(reversed(dims)), take("<I"), take("<Q")))
    alignment = metadata.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT
    start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, type_id, offset in table:
        kind = gguf.GGMLQuantizationType(type_id)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        elements = 1
        for d in shape:
            elements *= d
        tensors[name] = TensorEntry(kind.name, shape, start + offset, elements // block * size)
    return GGUFHeader(path, metadata, tensors, version, spans)


def tensor_bytes(header: GGUFHeader) -> int:
    """Bytes of all tensors as the file stores them."""
    return sum(t.nbytes for t in header.tensors.values())


def read_tensor(header: GGUFHeader, name: str) -> torch.Tensor:
    """A tensor's stored bytes as (rows, bytes per row) uint8 (a 1-D tensor: (1, bytes)), copied."""
    import numpy as np

    entry = header.tensors[name]
    data = np.fromfile(header.path, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
    rows = 1
    for d in entry.shape[:-1]:
        rows *= d
    return torch.from_numpy(data).view(rows, -1)



def rope_rows(rows: int, n_head: int) -> torch.Tensor:
    """(rows,) int64: row i of a q or k weight in the GGUF file is row ``rope_rows[i]`` of the
    transformers weight: convert_hf_to_gguf.py's ``LlamaModel.permute`` (each head's two rotary
    halves interleaved) as an index. ``n_head``: attention heads for q, key-value heads for k."""
    return torch.arange(rows).view(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def check_architecture(header: GGUFHeader) -> None:
    if header.architecture not in SUPPORTED_ARCHITECTURES:
        raise BaseModelError(f"{header.path.name}: GGUF architecture {header.architecture!r} is not supported by "
                             f"--quantize gguf and the GGUF export (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
                             "leave --quantize out to train on its float conversion")


def permutation_for(header: GGUFHeader, gguf_name: str) -> Optional[torch.Tensor]:
    """The row order of ``rope_rows`` for a q or k tensor of a permuted architecture, else None."""
    if header.architecture not in ROPE_PERMUTED:
        return None
    kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else ""
    if kind not in ("attn_q", "attn_k"):
        return None
    n_head = header.get("attention.head_count")
    heads = n_head if kind == "attn_q" else header.get("attention.head_count_kv", n_head)
    return rope_rows(header.tensors[gguf_name].shape[0], heads)


def gguf_names(model: nn.Module, header: GGUFHeader) -> dict[str, str]:
    """{transformers tensor name: GGUF tensor name} for every weight and bias of ``model`` (a
    Parameter or a quantized weight; LoRA layers keep their base's names), by gguf-py's table:
    ``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``. A head tied to the
    embedding, in a file that holds no head of its own, maps to the embedding's tensor."""
    import gguf

    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[header.architecture]
    table = gguf.get_tensor_name_map(arch, header.get("block_count", 0))
    names, embedding = {}, None
    table_weight = model.get_input_embeddings().weight
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is None:
                continue
            found = table.get_name(f"{module_name}.{attr}", try_suffixes=(".weight", ".bias"))
            if found is not None:
                names[f"{module_name}.{attr}"] = found
            if attr == "weight" and module.weight is table_weight and embedding is None:
                embedding = f"{module_name}.weight"
    head = model.get_output_embeddings()
    head_name = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
    if (head_name is not None and names.get(head_name) not in header.tensors and embedding in names
            and getattr(model.config, "tie_word_embeddings", False)):
        names[head_name] = names[embedding]
    return names


# -- config and tokenizer, once per file ----------------------------------------------------------

def blocks_dir(gguf_path: os.PathLike, cache_root: Optional[os.PathLike] = None) -> Path:
    converted = converted_dir(gguf_path, cache_root)
    return converted.with_name(converted.name + ".blocks")


def config_and_tokenizer_dir(gguf_path: os.PathLike, cache_root: Optional[os.PathLike] = None) -> Path:
    """A folder holding the file's transformers config and tokenizer (not its weights): base_model's
    conversion when there is one, else ``blocks_dir``, made once."""
    path = Path(gguf_path)
    converted = converted_dir(path, cache_root)
    if is_converted(converted):
        return converted
    final = blocks_dir(path, cache_root)
    if (final / INDEX_NAME).is_file():
        return final

    def fill(tmp: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from .base_model import without_conversion_bar

        try:
            with without_conversion_bar():
                config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError, NotImplementedError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BaseModelError(f"{path}: transformers could not read its config or tokenizer ({first})") from None
        if hasattr(config, "quantization_config"):  # the weights here are ours, not transformers' GGUF loader's
            del config.quantization_config
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / INDEX_NAME).write_text(json.dumps({"gguf_file": str(path.resolve())}, indent=2))

    print(f"reading the config and tokenizer of {path.name} (once; cached in {final})", flush=True)
    return publish_folder(final, fill, lambda folder: (folder / INDEX_NAME).is_file())


# -- the model -------------------------------------------------------------------------------------

def load_gguf_base(gguf_path: os.PathLike, dtype: torch.dtype = torch.float32,
                   cache_root: Optional[os.PathLike] = None):
    """(model, tokenizer): the transformers causal LM of a GGUF file with its Linears and token
    embedding in the file's blocks (QuantLinear / QuantEmbedding over GGUFWeight; a tied head
    shares the embedding's), its norms in ``dtype``, computing in ``dtype``; in eval mode.

    Raises BaseModelError for a file that is missing, not GGUF, of another architecture, or holds
    a tensor type GGUFWeight does not read (named, with what is supported).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from minilora.gguf_quant import GGUFWeight, UnsupportedGGMLTypeError
    from minilora.quant import QuantEmbedding, QuantLinear

    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise BaseModelError(f"{gguf_path}: no such file (a GGUF base model is a .gguf file, as llama.cpp and "
                             "Ollama use)")
    header = read_header(path)
    check_architecture(header)
    folder = config_and_tokenizer_dir(path, cache_root)
    config = AutoConfig.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with torch.device("meta"):  # no float weights are ever allocated: each module gets the file's tensor
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = gguf_names(model, header)
    weights: dict[str, GGUFWeight] = {}  # GGUF name -> weight: a tied head gets the embedding's own

    def weight_of(param_name: str, gguf_name: str) -> GGUFWeight:
        if gguf_name not in weights:
            entry = header.tensors[gguf_name]
            blocks = read_tensor(header, gguf_name)
            order = permutation_for(header, gguf_name)
            if order is not None:  # back to the transformers row order: whole rows of blocks move
                blocks = blocks[torch.argsort(order)]
            try:
                weights[gguf_name] = GGUFWeight(blocks, entry.ggml_type, entry.shape[-1], dtype)
            except UnsupportedGGMLTypeError as e:
                raise BaseModelError(f"{path.name}: {gguf_name} ({param_name}): {e}") from None
        return weights[gguf_name]

    def float_tensor(gguf_name: str) -> torch.Tensor:
        entry = header.tensors[gguf_name]  # a norm or a bias: F32 (or F16) values, read as a one-row weight
        values = GGUFWeight(read_tensor(header, gguf_name), entry.ggml_type, entry.shape[-1]).dequantize(dtype)
        order = permutation_for(header, gguf_name.replace(".bias", ".weight"))
        return values.reshape(entry.shape)[torch.argsort(order)] if order is not None else values.reshape(entry.shape)

    missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if names.get(n) not in header.tensors]
    if missing:
        raise BaseModelError(f"{path.name}: no tensor in the file for {', '.join(missing[:3])}"
                             f"{' …' if len(missing) > 3 else ''}; is it a {header.architecture} causal LM?")
    for module_name, module in list(model.named_modules()):
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, nn.Linear):
            weight = weight_of(prefix + "weight", names[prefix + "weight"])
            bias = None
            if module.bias is not None:
                bias = nn.Parameter(float_tensor(names[prefix + "bias"]), requires_grad=False)
            _replace(model, module_name, QuantLinear(weight, bias))
        elif isinstance(module, nn.Embedding):
            weight = weight_of(prefix + "weight", names[prefix + "weight"])
            _replace(model, module_name, QuantEmbedding(weight, module.padding_idx))
        else:
            for attr, param in list(module.named_parameters(recurse=False)):
                setattr(module, attr, nn.Parameter(float_tensor(names[prefix + attr]), requires_grad=param.requires_grad))
        if any(b.is_meta for b in module.buffers(recurse=False)):
            # computed at construction, not stored (the rotary embedding's inverse frequencies)
            _replace(model, module_name, type(module)(config=model.config))
    model.name_or_path = str(path)  # what a saved adapter names as its base: the file
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
