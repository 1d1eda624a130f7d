"""Chat drift: how far fine-tuning moved an instruct model away from its own behaviour as an
assistant, on everyday (non-medical) requests.

Raw-text perplexity does not show what an instruct model forgets: any language-model training on
prose moves it toward plain text, so general-text perplexity can fall while the assistant gets
worse. Drift measures the assistant directly:

1. before training, the base answers each everyday prompt (shipped in assets/general_prompts.jsonl)
   greedily through its chat template, ``max_new_tokens`` tokens at most (answers.py);
2. after training, the adapted model scores those very answers (teacher-forced);
3. drift = adapted mean NLL per answer token - the base's, in nats. 0 means the model would still
   say what the base said; larger means it moved away.

    probe = probe_base(model, tokenizer)   # before training (or under minilora.disable_adapters)
    ... train ...
    chat_drift(model, probe)               # {"drift", "nll", "base_nll", "prompts", "tokens"}

Only instruct bases (tokenizers with a chat template) are probed: for a plain base model "its
behaviour as an assistant" does not exist.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..inference import eval_mode, model_device, pad_rows
from ..loss import IGNORE, next_token_nll, predicted_tokens
from ..outputs import PROBE_FILE, is_token_lists
from .answers import base_answers, greedy_answers, load_prompts

ANSWER_TOKENS = 40  # tokens of each base answer: enough to show style and content, cheap to score


@dataclass
class ChatProbe:
    """The base's own answers: prompt and answer token ids per prompt, and the base's score."""
    prompts: list[str]
    prompt_ids: list[list[int]]  # the chat-templated prompt, ending where the assistant's turn starts
    answer_ids: list[list[int]]  # the base's greedy answer (up to and including its end-of-turn token)
    base_nll: float              # the base's mean NLL per answer token, in nats

    @property
    def tokens(self) -> int:
        return sum(len(a) for a in self.answer_ids)


def is_probe(value) -> bool:
    """Whether ``value`` is what ``dataclasses.asdict(ChatProbe)`` wrote: one prompt, prompt and answer per entry."""
    return (isinstance(value, dict) and set(value) == {f.name for f in dataclasses.fields(ChatProbe)}
            and isinstance(value["prompts"], list) and all(isinstance(p, str) for p in value["prompts"])
            and is_token_lists(value["prompt_ids"], len(value["prompts"]))
            and is_token_lists(value["answer_ids"], len(value["prompts"]))
            and isinstance(value["base_nll"], (int, float)) and math.isfinite(value["base_nll"]))


@torch.no_grad()
def probe_base(model, tokenizer, prompts: Optional[Sequence[str]] = None, max_new_tokens: int = ANSWER_TOKENS,
               batch_size: int = 20, weights: Optional[str] = None) -> ChatProbe:
    """The base's greedy answers to ``prompts`` (default: the shipped everyday set) and its own
    mean NLL of them. Call it on the model before training, or with its adapters disabled.
    ``weights`` (answers.fingerprint of the model): the answers come from the disk cache when this
    model has given them before."""
    prompts = list(load_prompts() if prompts is None else prompts)
    if weights is None:
        prompt_ids, answer_ids = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    else:
        answers = base_answers(model, tokenizer, prompts, max_new_tokens, weights, batch_size)
        prompt_ids, answer_ids = answers.prompt_ids, answers.answer_ids
    probe = ChatProbe(prompts, prompt_ids, answer_ids, base_nll=math.nan)
    probe.base_nll = answer_nll(model, probe)
    return probe


@torch.no_grad()
def answer_nll(model, probe: ChatProbe, batch_size: int = 20) -> float:
    """``model``'s mean NLL per token of the probe's answers, each after its own prompt (nats)."""
    device = model_device(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(probe.prompts), batch_size):
            prompts = probe.prompt_ids[start:start + batch_size]
            answers = probe.answer_ids[start:start + batch_size]
            rows = [p + a for p, a in zip(prompts, answers)]
            ids, mask = pad_rows(rows, 0, side="right", device=device)  # right padding: causal rows unaffected
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, L, V)
            targets = torch.full_like(ids, IGNORE)
            for i, (p, a) in enumerate(zip(prompts, answers)):
                targets[i, len(p):len(p) + len(a)] = ids[i, len(p):len(p) + len(a)]
            total += next_token_nll(logits, targets).item()  # a host sync, once per batch of prompts
            count += int(predicted_tokens(targets))
    return total / count


def chat_drift(model, probe: ChatProbe) -> dict:
    """{"drift": nll - base_nll, "nll", "base_nll", "prompts", "tokens"}: nats per answer token."""
    nll = answer_nll(model, probe)
    return {"drift": nll - probe.base_nll, "nll": nll, "base_nll": probe.base_nll, "prompts": len(probe.prompts),
            "tokens": probe.tokens}
