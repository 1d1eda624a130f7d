"""Remedies for forgetting that mix other text into the medical training windows.

- ``--replay_general F``: a share F of the training windows is general English held apart from
  the general evaluation text (the fortunes the forgetting check does not score; or the
  training split of --replay_general_dataset).
- ``--replay_self F``: a share F is self-distillation: the base's own greedy answers, through its
  chat template, to everyday instructions held apart from the chat-drift probe's
  (assets/distill_prompts.jsonl), loss on the answers only. No outside data needed.

The run's length in updates and tokens stays what --max_steps / --num_train_epochs say: replay
takes its share of the same token budget. With N medical windows and shares F_i, round(N * F_i /
(1 - sum F)) windows of pool i join them (drawn without repetition while the pool lasts), and the
loop's shuffle spreads them over the run.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from . import data, drift
from .config import UsageError
from .loss import IGNORE
from .outputs import is_token_lists

DISTILL_PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "distill_prompts.jsonl")
DISTILL_ANSWER_TOKENS = 128  # long enough to carry the assistant's style past its first sentence
SELF_ANSWERS_FILE = "self_distillation.json"  # in the run directory: a resumed run trains on the same answers


def general_pool(args, tokenizer) -> data.Windows:
    """General English never scored by the forgetting check: the fortunes' training share, or
    every split but validation of --replay_general_dataset."""
    packer = data.Packer(tokenizer, args.max_seq_length)
    if args.replay_general_dataset:
        records = data.load_records(args.replay_general_dataset, tmp_dir=args.tmp_dir)
        parts = [packer.pack(split, data.record_kind(split.column_names, f"{args.replay_general_dataset} ({name})"))
                 for name, split in records.items() if name != "validation"]
        if not parts:
            raise UsageError(f"--replay_general_dataset {args.replay_general_dataset}: only a validation split; "
                             "replay trains on the other splits")
        return data.Windows(torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]))
    from .demo_assets import default_general_training

    return packer.pack_texts(default_general_training())


def self_distillation_pool(args, model, tokenizer, run_dir, is_main: bool,
                           base_cache: Optional[dict] = None) -> data.Windows:
    """Windows of the base's own answers to the distillation prompts (loss on the answers only).
    A resumed run reads the answers its first start wrote; ``base_cache`` keeps them across runs
    in one process that start from the same base (a sweep)."""
    key = ("self_distillation", args.model_name, args.bf16)  # answered before --quantize: it does not change them
    if args.resume_from_checkpoint and run_dir.exists(SELF_ANSWERS_FILE):
        pairs = run_dir.read_json(SELF_ANSWERS_FILE,
                                  lambda v: isinstance(v, list) and all(is_token_lists(p, 2) for p in v),
                                  "a list of [prompt ids, answer ids] pairs")
    elif base_cache is not None and key in base_cache:
        pairs = base_cache[key]
    else:
        if not drift.has_chat_template(tokenizer):
            raise UsageError("--replay_self needs an instruct base (a tokenizer with a chat template): it trains on "
                             "the base's own chat answers")
        prompt_ids, answer_ids = drift.greedy_answers(model, tokenizer, drift.load_prompts(DISTILL_PROMPTS_FILE),
                                                      DISTILL_ANSWER_TOKENS)
        pairs = [[p, a] for p, a in zip(prompt_ids, answer_ids)]
    if base_cache is not None:
        base_cache[key] = pairs
    if is_main:
        run_dir.write_json(SELF_ANSWERS_FILE, pairs)
    packer = data.Packer(tokenizer, args.max_seq_length)
    docs = ((p + a, [IGNORE] * len(p) + a) for p, a in pairs)
    windows = list(packer.windows(docs))
    return data.Windows(torch.from_numpy(np.stack([w[0] for w in windows])),
                        torch.from_numpy(np.stack([w[1] for w in windows])))


def mix(train: data.Windows, pools: list[tuple[data.Windows, float]], seed: int) -> data.Windows:
    """``train`` plus, from each (pool, fraction), the windows that make that fraction of the
    whole; a pool smaller than its share is repeated (in a fresh order each time)."""
    shares = sum(f for _, f in pools)
    if shares >= 1:
        raise UsageError(f"--replay_general + --replay_self must stay below 1 (the rest is the medical data), "
                         f"got {shares:g}")
    n = len(train)
    generator = torch.Generator().manual_seed(seed)
    ids, labels = [train.input_ids], [train.labels]
    for pool, fraction in pools:
        want = round(n * fraction / (1.0 - shares))
        if len(pool) == 0:
            raise UsageError("the replay text holds no window to train on")
        order = torch.cat([torch.randperm(len(pool), generator=generator)
                           for _ in range(-(-want // len(pool)))])[:want]
        ids.append(pool.input_ids[order])
        labels.append(pool.labels[order])
    return data.Windows(torch.cat(ids), torch.cat(labels))


def with_replay(args, train_data: data.TrainData, model, tokenizer, run_dir, is_main: bool,
                base_cache: Optional[dict] = None) -> data.TrainData:
    """``train_data`` with the replay windows --replay_general / --replay_self ask for."""
    if not (args.replay_general or args.replay_self):
        return train_data
    if train_data.train is None:
        raise UsageError("--replay_general / --replay_self need a dataset held in memory, not --streaming_data")
    pools = []
    if args.replay_general:
        pools.append((general_pool(args, tokenizer), args.replay_general))
    if args.replay_self:
        pools.append((self_distillation_pool(args, model, tokenizer, run_dir, is_main, base_cache), args.replay_self))
    return data.TrainData(train=mix(train_data.train, pools, args.seed), stream=None,
                          validation=train_data.validation)
