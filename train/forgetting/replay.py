"""Remedies for forgetting that mix other text into the medical training windows.

- ``--replay_self F``, the forgetting guard: a share F is self-distillation, the base's own greedy
  answers, through its chat template, to everyday instructions held apart from the chat-drift
  probe's (assets/distill_prompts.jsonl), loss on the answers only. No outside data needed. On by
  default for instruct bases (a tokenizer with a chat template) at ``config.GUARD_SHARE``;
  ``--replay_self 0`` turns it off.
- ``--replay_general F``: a share F of the training windows is general English held apart from
  the general evaluation text (the fortunes the forgetting check does not score; or the
  training split of --replay_general_dataset).

With N medical windows and shares F_i, round(N * F_i / (1 - sum F)) windows of pool i join them
(drawn without repetition while the pool lasts), and the loop's shuffle spreads them over the run.
With --max_steps the run's length in updates and tokens stays the same (replay takes its share of
that budget); an epoch, which still holds every medical window once, grows by 1 / (1 - sum F).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import data
from ..config import GUARD_SHARE, UsageError
from ..loss import IGNORE
from ..outputs import SELF_ANSWERS_FILE
from .answers import DISTILL_PROMPTS_FILE, Answers, base_answers, has_chat_template, load_prompts

DISTILL_ANSWER_TOKENS = 128  # long enough to carry the assistant's style past its first sentence


def guard_share(args, tokenizer) -> tuple[float, Optional[str]]:
    """(--replay_self share for this run, why the guard is off or None). Unset, it is GUARD_SHARE
    on an instruct base whose data is held in memory, else 0; a share given by the user stays."""
    if args.replay_self is not None:
        return args.replay_self, None if args.replay_self else "off (--replay_self 0)"
    if not has_chat_template(tokenizer):
        return 0.0, "off: the base has no chat template (not an instruct model), so it has no answers of its own"
    if args.streaming_data:
        return 0.0, "off: --streaming_data (replay mixes windows held in memory)"
    if args.replay_general + GUARD_SHARE >= 1:
        return 0.0, f"off: --replay_general {args.replay_general:g} leaves no room for its {GUARD_SHARE:g} share"
    return GUARD_SHARE, None


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
    from ..demo_assets import default_general_training

    return packer.pack_texts(default_general_training())


def self_distillation_answers(model, tokenizer, weights: str) -> Answers:
    """The base's own answers to the distillation prompts (answers.base_answers: cached on disk)."""
    if not has_chat_template(tokenizer):
        raise UsageError("--replay_self needs an instruct base (a tokenizer with a chat template): it trains on "
                         "the base's own chat answers")
    prompts = load_prompts(DISTILL_PROMPTS_FILE)
    # One generate call for all: on a CPU each decoding step has a fixed cost that smaller batches pay
    # again and again (docs/forgetting.md, "The forgetting guard", measures it).
    return base_answers(model, tokenizer, prompts, DISTILL_ANSWER_TOKENS, weights, batch_size=len(prompts))


def self_distillation_pool(args, tokenizer, pairs: list) -> data.Windows:
    """Windows of (prompt, answer) token pairs, loss on the answers only."""
    packer = data.Packer(tokenizer, args.max_seq_length)
    docs = ((p + a, [IGNORE] * len(p) + a) for p, a in pairs)
    windows = list(packer.windows(docs))
    return data.Windows(torch.from_numpy(np.stack([w[0] for w in windows])),
                        torch.from_numpy(np.stack([w[1] for w in windows])))


def windows_added(medical: int, fraction: float, shares: float) -> int:
    """Windows of a pool with share ``fraction`` that join ``medical`` windows when all pools'
    shares sum to ``shares``: that pool's part of the whole."""
    return round(medical * fraction / (1.0 - shares))


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
        want = windows_added(n, fraction, shares)
        if len(pool) == 0:
            raise UsageError("the replay text holds no window to train on")
        order = torch.cat([torch.randperm(len(pool), generator=generator)
                           for _ in range(-(-want // len(pool)))])[:want]
        ids.append(pool.input_ids[order])
        labels.append(pool.labels[order])
    return data.Windows(torch.cat(ids), torch.cat(labels))


def with_replay(args, train_data: data.TrainData, tokenizer, self_pairs: Optional[list] = None) -> data.TrainData:
    """``train_data`` with the replay windows --replay_general and --replay_self (its ``self_pairs``,
    the base's answers) ask for."""
    if not (args.replay_general or args.replay_self):
        return train_data
    if train_data.train is None:
        raise UsageError("--replay_general / --replay_self need a dataset held in memory, not --streaming_data")
    pools = []
    if args.replay_general:
        pools.append((general_pool(args, tokenizer), args.replay_general))
    if args.replay_self:
        pools.append((self_distillation_pool(args, tokenizer, self_pairs), args.replay_self))
    return data.TrainData(train=mix(train_data.train, pools, args.seed), stream=None,
                          validation=train_data.validation)
