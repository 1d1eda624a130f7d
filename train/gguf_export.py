"""Hand a trained adapter back to llama.cpp (and Ollama): a GGUF LoRA adapter, or a merged GGUF.

    minilora-export ADAPTER --to gguf-lora --base x.gguf --out adapter.gguf     # llama.cpp --lora / Ollama ADAPTER
    minilora-export ADAPTER --to gguf-merged --base x.gguf --out merged.gguf [--outtype f16]

From Python: ``export_gguf_lora(adapter_dir, base_gguf, out)`` and ``export_gguf_merged(...)``;
``lora_pairs(model, header)`` gives the adapter tensors of a model already in memory.

What llama.cpp's loader (src/llama-adapter.cpp) requires, as its converter
(convert_lora_to_gguf.py) writes it:
  - metadata ``general.type=adapter``, ``general.architecture`` = the base's, ``adapter.type=lora``,
    ``adapter.lora.alpha`` (float32);
  - per adapted tensor ``<base tensor>.lora_a`` (r, in) and ``.lora_b`` (out, r), in torch order;
    for the token embedding ``lora_a`` is (vocab, r), A transposed, as llama.cpp looks rows up in it;
  - llama.cpp scales each pair by alpha / r, r read from lora_b: a module whose scaling differs
    (rank_pattern, alpha_pattern, rsLoRA's alpha / sqrt(r)) gets the ratio multiplied into lora_b;
  - q and k of a "llama" file hold their rows in the RoPE order of convert_hf_to_gguf.py
    (gguf_base.rope_rows), so lora_B's rows (and a merged delta's) are put in that order too.
What it cannot load is refused in one line: DoRA, modules_to_save, trained biases, LoRA on the
head of a base whose head is its token embedding (llama.cpp holds no separate head tensor). The
merged export reads the adapter the same way, so it refuses the same.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import struct
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .base_model import adapter_defaults, is_gguf
from .config import UsageError
from .gguf_base import (GGUFHeader, check_architecture, gguf_names, load_gguf_base, permutation_for, read_header,
                        read_tensor)

TARGETS = ("gguf-lora", "gguf-merged")


class ExportError(UsageError):
    """An adapter or base that cannot be exported as asked (a ValueError; the CLI prints one line)."""


@dataclass
class LoraPair:
    """One adapted tensor of the base file: ``name`` (e.g. ``blk.3.attn_q.weight``), ``a`` and
    ``b`` float32 as llama.cpp reads them (see the module docstring), ``scaling`` the model's own."""

    name: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        """The (out, in) float32 update of the base tensor, in the file's row order."""
        if self.name == "token_embd.weight":  # a (vocab, r), b (dim, r): delta (vocab, dim)
            return (self.a @ self.b.t()) * self.scaling
        return (self.b @ self.a) * self.scaling


def check_exportable(config) -> None:
    """Raise ExportError for an adapter (a LoRAConfig) that a llama.cpp LoRA cannot express."""
    if config.use_dora:
        raise ExportError("a DoRA adapter cannot be a llama.cpp LoRA (llama.cpp applies x Aᵀ Bᵀ · scale, with no "
                          "magnitude vector): train a plain LoRA (use_dora=False)")
    if config.modules_to_save:
        raise ExportError(f"the adapter trains {', '.join(config.modules_to_save)} in full (modules_to_save), which a "
                          "llama.cpp LoRA cannot hold: train without modules_to_save")
    if config.bias != "none":
        raise ExportError(f"the adapter trains biases (bias={config.bias!r}); a llama.cpp LoRA holds A and B only: "
                          "train with bias='none'")


def lora_pairs(model, header: GGUFHeader, adapter_name: str = "default") -> list[LoraPair]:
    """The adapter ``adapter_name`` of ``model`` (a base of ``header``'s file with LoRA layers), as
    GGUF tensors. Raises ExportError for what llama.cpp cannot run (see the module docstring)."""
    import minilora
    from minilora.inject import adapter_state

    config = adapter_state(model).configs.get(adapter_name)
    if config is None:
        raise ExportError(f"the model has no adapter {adapter_name!r} to export")
    check_exportable(config)
    names = gguf_names(model, header)
    pairs = []
    for name, module in minilora.lora_modules(model):
        adapter = module.adapters[adapter_name] if adapter_name in module.adapters else None
        if adapter is None:
            continue
        target = names.get(f"{name}.weight")
        if target is None or target not in header.tensors:
            raise ExportError(f"{name} has no tensor in {header.path.name}; is the adapter trained on this base?")
        if module is model.get_output_embeddings() and target == "token_embd.weight":
            raise ExportError(f"the adapter puts LoRA on {name}, whose weight is the token embedding in this base "
                              "(tied); llama.cpp has no separate head tensor to attach it to: train without "
                              f"{name.rpartition('.')[2]} in target_modules")
        a, b = adapter.lora_A.detach().float().cpu(), adapter.lora_B.detach().float().cpu()
        if isinstance(module, minilora.LoRAEmbedding):
            a = a.t().contiguous()  # (vocab, r): llama.cpp gathers the looked-up tokens' rows of A
        else:
            order = permutation_for(header, target)
            if order is not None:
                b = b[order]
        pairs.append(LoraPair(target, a, b, float(adapter.scaling)))
    if not pairs:
        raise ExportError(f"the model has no LoRA layer of adapter {adapter_name!r} to export")
    return pairs


def _adapter_model(adapter_dir: str, base: GGUFHeader, adapter_name: str = "default"):
    """The base file's block model with the adapter at ``adapter_dir`` loaded (and checked) by minilora."""
    import minilora

    check_architecture(base)
    try:
        config, _ = minilora.read_adapter_config(adapter_dir)
    except minilora.AdapterLoadError as e:
        raise ExportError(str(e)) from None
    check_exportable(config)
    model, _ = load_gguf_base(base.path)
    try:
        minilora.load_adapter(model, adapter_dir, adapter_name=adapter_name)
    except minilora.AdapterLoadError as e:
        raise ExportError(f"{adapter_dir}: {e}") from None
    return model


def _write_atomically(out: os.PathLike, write) -> Path:
    """``write(tmp path)``, then renamed to ``out``: a failed export leaves no file behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# -- a GGUF LoRA adapter ---------------------------------------------------------------------------

def write_gguf_lora(pairs: list[LoraPair], header: GGUFHeader, out: os.PathLike, alpha: float,
                    name: Optional[str] = None) -> Path:
    """Write ``pairs`` as a llama.cpp LoRA adapter for ``header``'s base. llama.cpp scales a pair
    by ``alpha / r``; where a pair's own scaling differs, the ratio goes into lora_b."""
    import gguf
    import numpy as np

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), header.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        if name:
            writer.add_name(name)
        for pair in pairs:
            rank = pair.b.shape[1]
            b = pair.b if pair.scaling == alpha / rank else pair.b * (pair.scaling / (alpha / rank))
            writer.add_tensor(f"{pair.name}.lora_a", pair.a.numpy().astype(np.float32))
            writer.add_tensor(f"{pair.name}.lora_b", b.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _write_atomically(out, write)


def export_gguf_lora(adapter_dir: str, base_gguf: os.PathLike, out: os.PathLike, adapter_name: str = "default") -> Path:
    """The adapter folder ``adapter_dir`` (PEFT format, trained on ``base_gguf`` or its conversion)
    as a GGUF LoRA adapter at ``out`` that llama.cpp loads over ``base_gguf`` (``--lora out``)."""
    import minilora

    header = read_header(base_gguf)
    model = _adapter_model(adapter_dir, header, adapter_name)
    config, _ = minilora.read_adapter_config(adapter_dir)
    return write_gguf_lora(lora_pairs(model, header, adapter_name), header, out, config.lora_alpha,
                           name=Path(adapter_dir).name)


# -- a merged GGUF ---------------------------------------------------------------------------------

# What gguf-py can quantize (gguf.quants.quantize): a merged tensor is re-quantized to its own type
# only among these; the K-quants have a dequantizer there but no quantizer.
REQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def write_gguf(out: os.PathLike, header: GGUFHeader, tensors: list[tuple[str, str, tuple, Callable[[], bytes]]],
               replace: Optional[dict[str, bytes]] = None) -> Path:
    """A GGUF file (the format of ggml's docs/gguf.md, ``header``'s version) holding ``header``'s
    metadata entries as the base file stores them (the tokenizer, the chat template …), those named
    in ``replace`` swapped for the given encoded entries, and ``tensors``: (name, ggml type name,
    shape in torch order, a function giving the stored bytes), each at an aligned offset. The
    tensors are made one at a time as they are written: one of them is in memory at once."""
    import gguf

    alignment = header.metadata.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT
    replace = replace or {}

    def pad(size: int) -> bytes:
        return b"\0" * (-size % alignment)

    def nbytes(ggml_type: str, shape: tuple) -> int:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
        return math.prod(shape) // block * size

    def write(tmp: Path) -> None:
        with open(header.path, "rb") as base, open(tmp, "wb") as f:
            f.write(b"GGUF" + struct.pack("<IQQ", header.version, len(tensors), len(header.kv_spans)))
            for key, (start, end) in header.kv_spans.items():
                if key in replace:
                    f.write(replace[key])
                else:
                    base.seek(start)
                    f.write(base.read(end - start))
            offset = 0
            for name, ggml_type, shape, _ in tensors:
                encoded = name.encode()
                f.write(struct.pack("<Q", len(encoded)) + encoded + struct.pack("<I", len(shape)))
                f.write(struct.pack(f"<{len(shape)}Q", *reversed(shape)))  # ggml's order: the row's values first
                f.write(struct.pack("<IQ", gguf.GGMLQuantizationType[ggml_type].value, offset))
                size = nbytes(ggml_type, shape)
                offset += size + len(pad(size))
            f.write(pad(f.tell()))
            for name, ggml_type, shape, make in tensors:
                data = make()
                if len(data) != nbytes(ggml_type, shape):
                    raise RuntimeError(f"{name}: {len(data)} bytes made for a {ggml_type} tensor of shape {shape}")
                f.write(data)
                f.write(pad(len(data)))

    return _write_atomically(out, write)


def _kv_u32(key: str, value: int) -> bytes:
    encoded = key.encode()
    return struct.pack("<Q", len(encoded)) + encoded + struct.pack("<II", 4, value)  # 4: GGUF's uint32


def export_gguf_merged(adapter_dir: Optional[str], base_gguf: os.PathLike, out: os.PathLike,
                       outtype: str = "base", adapter_name: str = "default") -> Path:
    """``base_gguf`` with the adapter merged in, at ``out``: one file llama.cpp runs alone, with the
    base's metadata and tokenizer. ``outtype="base"``: each adapted tensor re-quantized to its own
    type (one of REQUANTIZABLE), the others copied byte for byte; ``"f16"``: every weight matrix
    written as F16 (the F32 norms stay F32), general.file_type set to MOSTLY_F16.
    ``adapter_dir=None`` merges nothing: with ``outtype="f16"``, the base converted to F16.

    Re-quantizing to the base's type rounds each merged weight to the type's grid again: an update
    smaller than half a quantization step mostly rounds away (docs/gguf.md has the measurement).
    """
    import gguf
    import numpy as np

    if outtype not in ("base", "f16"):
        raise ExportError(f"--outtype must be base (each tensor in the base's type) or f16, got {outtype!r}")
    header = read_header(base_gguf)
    deltas = {}
    if adapter_dir is not None:
        model = _adapter_model(adapter_dir, header, adapter_name)
        pairs = lora_pairs(model, header, adapter_name)
        del model
        if "output.weight" not in header.tensors and any(p.name == "token_embd.weight" for p in pairs):
            raise ExportError("the adapter puts LoRA on the token embedding, which this base also uses as its head "
                              "(tied): merged, it would change the head too; export it with --to gguf-lora")
        deltas = {p.name: p.delta() for p in pairs}
    if outtype == "base":
        cannot = sorted({header.tensors[n].ggml_type for n in deltas} - set(REQUANTIZABLE))
        if cannot:
            raise ExportError(f"gguf-py cannot quantize {', '.join(cannot)}, the type of adapted tensors of this base: "
                              "export with --outtype f16 (llama-quantize can then re-quantize the file)")

    def stored(name: str) -> bytes:
        return read_tensor(header, name).numpy().tobytes()

    def merged(name: str, ggml_type: str) -> bytes:
        """The tensor dequantized (gguf-py), plus its delta, quantized to ``ggml_type`` (gguf-py)."""
        entry = header.tensors[name]
        kind = gguf.GGMLQuantizationType[entry.ggml_type]
        data = read_tensor(header, name).numpy()
        if kind == gguf.GGMLQuantizationType.F16:  # gguf-py takes F16 values as float16, the rest as bytes
            data = data.view(np.float16)
        values = gguf.quants.dequantize(data, kind).reshape(entry.shape)
        if name in deltas:
            values = values + deltas[name].numpy()
        return gguf.quants.quantize(values.astype(np.float32), gguf.GGMLQuantizationType[ggml_type]).tobytes()

    tensors = []
    for name, entry in header.tensors.items():
        ggml_type = "F16" if outtype == "f16" and entry.ggml_type != "F32" and len(entry.shape) > 1 else entry.ggml_type
        if name in deltas or ggml_type != entry.ggml_type:
            tensors.append((name, ggml_type, entry.shape, functools.partial(merged, name, ggml_type)))
        else:
            tensors.append((name, ggml_type, entry.shape, functools.partial(stored, name)))
    replace = {}
    if outtype == "f16":
        key = gguf.Keys.General.FILE_TYPE  # informative (each tensor names its type): set where the base has it
        if key in header.kv_spans:
            replace[key] = _kv_u32(key, int(gguf.LlamaFileType.MOSTLY_F16))
    return write_gguf(out, header, tensors, replace)


# -- the command line ------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="minilora-export", description="Export a trained adapter for llama.cpp / Ollama (docs/gguf.md).")
    parser.add_argument("adapter", help="the adapter folder (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--to", required=True, choices=TARGETS,
                        help="gguf-lora: a LoRA adapter llama.cpp loads over the base (--lora, Ollama's ADAPTER); "
                             "gguf-merged: the base with the adapter merged in, one file")
    parser.add_argument("--base", help="the base .gguf file (default: the adapter's base_model_name_or_path, when "
                                       "that is a .gguf file)")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--outtype", default="base", choices=("base", "f16"),
                        help="gguf-merged: adapted tensors re-quantized to the base's types (base), or every "
                             "weight as F16 (f16)")
    args = parser.parse_args(argv)
    from .command import require_app_packages, run_command

    require_app_packages("minilora-export")

    def export() -> int:
        base = args.base or adapter_defaults(args.adapter)[0]
        if not base:
            raise ExportError(f"{args.adapter}: no adapter_config.json there names a base model; give the base .gguf "
                              "file with --base")
        if not is_gguf(base):
            raise ExportError(f"--base {base}: not a .gguf file; give the GGUF file the adapter was trained on (or the "
                              "one its float base was converted from) with --base")
        if not Path(base).expanduser().is_file():
            raise ExportError(f"--base {base}: no such file")
        if args.to == "gguf-lora":
            written = export_gguf_lora(args.adapter, Path(base).expanduser(), args.out)
        else:
            written = export_gguf_merged(args.adapter, Path(base).expanduser(), args.out, args.outtype)
        print(f"wrote {written} ({written.stat().st_size:,d} bytes)")
        return 0

    return run_command("minilora-export", sys.argv[1:] if argv is None else argv, export)


if __name__ == "__main__":
    sys.exit(main())
