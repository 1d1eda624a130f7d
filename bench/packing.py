"""Section ``packing``: real tokens / all tokens of the data pipeline's windows; and the text
(a tokenizer, records) that the packing and loop sections share."""

from __future__ import annotations

import json
import os

from .models import Settings


def bench_packing(tokenizer_dir: str, data_file: str, workdir: str, lengths=(256, 2048)) -> dict:
    """Real tokens / all tokens of the windows minilora_train.data.load_windows packs (documents are
    concatenated, [bos] text [eos], so only a split's last window is padded)."""
    from transformers import AutoTokenizer

    from minilora_train.data import load_windows

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = []
    for length in lengths:
        windows = load_windows(data_file, tokenizer, length, tmp_dir=workdir)
        total = windows.input_ids.numel()
        rows.append({"max_seq_length": length, "windows": len(windows), "real_tokens": windows.real_tokens,
                     "all_tokens": total, "efficiency": windows.real_tokens / total})
    return {"rows": rows}


def prepare_text(settings: Settings, medquad: str, workdir: str) -> tuple[str, str, str, str]:
    """(tokenizer dir, records to pack, the XLA section's training records, source note): a
    byte-level BPE (the embedded demo's kind, 8192 entries) trained on medquad's first 3000
    answers. Without medquad, generated sentences stand in and the figures say so."""
    from minilora_train.demo_assets import train_tokenizer

    if os.path.exists(medquad):
        with open(medquad, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        source = f"{medquad} ({len(lines):,d} records)"
        if settings.packing_records is not None:
            lines = lines[:settings.packing_records]
            source = f"{medquad} (first {len(lines):,d} records)"
        texts = [json.loads(line)["answer"] for line in lines[:3000]]
    else:
        words = "patient fever cough insulin diabetes hypertension aspirin dose chronic acute renal therapy".split()
        texts = [f"The {words[i % 12]} was treated with {words[(i * 7) % 12]} therapy for {i % 30} days."
                 for i in range(3000)]
        lines = [json.dumps({"text": t}) + "\n" for t in texts]
        source = f"generated sentences ({medquad} not found)"
    data_file = os.path.join(workdir, "records.jsonl")
    with open(data_file, "w", encoding="utf-8") as f:
        f.writelines(lines)
    loop_file = os.path.join(workdir, "loop-records.jsonl")
    with open(loop_file, "w", encoding="utf-8") as f:
        f.writelines(lines[:600])  # the XLA section's training data: plenty for its few updates
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    train_tokenizer(texts, 8192, tokenizer_dir)
    return tokenizer_dir, data_file, loop_file, source
