"""scripts/lab/sft_medquad.py: SFTTrainer gets the very conversations minilora-train trains on, and the
comparison table says what the JSON holds. The runs themselves go through SFTTrainer and
minilora_train.loop.run, tested in test_trainers.py and test_train_loop.py."""

from __future__ import annotations

import importlib.util
import os
import sys

from conftest import ROOT
from minilora_train.data import record_parts
from minilora_train.demo_assets import read_medquad
from trainers_worker import CHAT_TEMPLATE

spec = importlib.util.spec_from_file_location("sft_medquad", os.path.join(ROOT, "scripts", "lab", "sft_medquad.py"))
sft_medquad = importlib.util.module_from_spec(spec)
sys.modules["sft_medquad"] = sft_medquad
spec.loader.exec_module(sft_medquad)


def test_sfttrainer_gets_the_prompts_and_answers_minilora_train_trains_on(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    records = sft_medquad.chat_records("train")
    pairs = read_medquad("train")
    assert len(records) == len(pairs) == 2000
    for record, pair in list(zip(records, pairs))[::97]:
        # What TRL renders for a prompt-completion record: the prompt with the generation prompt,
        # then the whole conversation; minilora-train's --chat_template splits the same way.
        prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=False)
        assert (prompt, whole[len(prompt):]) == record_parts(pair, "qa", tokenizer)


def test_the_table_reports_each_runs_measurements():
    run = {"medical": {"base": 15.83, "adapted": 11.97, "change_percent": -24.4},
           "general": {"base": 96.33, "adapted": 90.18, "change_percent": -6.4},
           "chat_drift": {"drift": 0.159}, "seconds_per_update": 1.8}
    table = sft_medquad.table({"runs": {"minilora-train": run}})
    assert "| minilora-train | 15.83 → 11.97 (-24.4%) | 96.33 → 90.18 (-6.4%) | +0.159 | 1.80 |" in table
