"""Chat drift: how far fine-tuning moved an instruct model away from its own behaviour as an
assistant, on everyday (non-medical) requests.

Raw-text perplexity does not show what an instruct model forgets: any language-model training on
prose moves it toward plain text, so general-text perplexity can fall while the assistant gets
worse. Drift measures the assistant directly:

1. before training, the base answers each everyday prompt (shipped in assets/general_prompts.jsonl)
   greedily through its chat template, ``max_new_tokens`` tokens at most;
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
import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .inference import eval_mode, model_device, pad_rows
from .loss import IGNORE, next_token_nll, predicted_tokens

PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "general_prompts.jsonl")
ANSWER_TOKENS = 40  # tokens of each base answer: enough to show style and content, cheap to score


def load_prompts(path: str = PROMPTS_FILE) -> list[str]:
    """The everyday instructions: one JSON object with a non-empty "prompt" string a line."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ValueError(f"{path}:{number}: expected {{\"prompt\": \"<text>\"}}, got {line.strip()[:80]!r}")
            prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


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


def _templated(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


@torch.no_grad()
def probe_base(model, tokenizer, prompts: Optional[Sequence[str]] = None, max_new_tokens: int = ANSWER_TOKENS,
               batch_size: int = 20) -> ChatProbe:
    """The base's greedy answers to ``prompts`` (default: the shipped everyday set) and its own
    mean NLL of them. Call it on the model before training, or with its adapters disabled."""
    prompts = list(load_prompts() if prompts is None else prompts)
    prompt_ids, answer_ids = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    probe = ChatProbe(prompts, prompt_ids, answer_ids, base_nll=math.nan)
    probe.base_nll = answer_nll(model, probe)
    return probe


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 20) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) per prompt: each prompt through the chat template, and ``model``'s
    greedy answer to it, up to and including its end-of-turn token, ``max_new_tokens`` at most."""
    if not has_chat_template(tokenizer):
        raise ValueError("chat drift needs an instruct base: this tokenizer has no chat template")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    configured = getattr(model.generation_config, "eos_token_id", None)  # an id, a list of ids, or None
    stop_ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, (list, tuple)) else [configured])}
    prompt_ids = [_templated(tokenizer, p) for p in prompts]
    answer_ids: list[list[int]] = []
    device = model_device(model)
    with eval_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            rows = prompt_ids[start:start + batch_size]
            ids, mask = pad_rows(rows, pad_id, side="left", device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad_id)
            for row in out[:, ids.shape[1]:].tolist():  # (B, new): every row's answer starts at one column
                answer = []
                for token in row:
                    answer.append(token)
                    if token in stop_ids:
                        break  # the end of the assistant's turn is part of its behaviour; padding after it is not
                answer_ids.append(answer)
    return prompt_ids, answer_ids


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


# -- in a training run --------------------------------------------------------------------------

PROBE_FILE = "chat_probe.json"  # in the run directory: a resumed run compares against the same answers


def _is_probe(value) -> bool:
    """Whether ``value`` is what ``dataclasses.asdict(ChatProbe)`` wrote: one prompt, prompt and answer per entry."""
    from .outputs import is_token_lists

    return (isinstance(value, dict) and set(value) == {f.name for f in dataclasses.fields(ChatProbe)}
            and isinstance(value["prompts"], list) and all(isinstance(p, str) for p in value["prompts"])
            and is_token_lists(value["prompt_ids"], len(value["prompts"]))
            and is_token_lists(value["answer_ids"], len(value["prompts"]))
            and isinstance(value["base_nll"], (int, float)) and math.isfinite(value["base_nll"]))


def probe_for_run(args, model, tokenizer, run_dir, device) -> tuple[Optional[ChatProbe], Optional[str]]:
    """(probe, None) for a run that measures chat drift, else (None, why not). Called before
    the first update; a resumed run reads the probe its first start wrote, since the base may be
    gone by then (full fine-tuning)."""
    if args.chat_drift_prompts == 0:
        return None, "off (--chat_drift_prompts 0)"
    if not has_chat_template(tokenizer):
        return None, "not measured: the base has no chat template (not an instruct model)"
    if device.is_xla or device.layout.kind != "single":
        # Greedy generation compiles a graph per length on XLA, and a sharded model generates only
        # with every process taking part: measure drift on one eager device instead.
        return None, "not measured: chat drift runs on a single eager device (CPU or one GPU)"
    if args.resume_from_checkpoint and run_dir.exists(PROBE_FILE):
        return ChatProbe(**run_dir.read_json(PROBE_FILE, _is_probe, "prompts, prompt_ids, answer_ids, base_nll")), None
    prompts = load_prompts()[:args.chat_drift_prompts] if args.chat_drift_prompts else None
    probe = probe_base(model, tokenizer, prompts)
    if device.is_main:
        run_dir.write_json(PROBE_FILE, dataclasses.asdict(probe))
    return probe, None


def chat_drift(model, probe: ChatProbe) -> dict:
    """{"drift": nll - base_nll, "nll", "base_nll", "prompts", "tokens"}: nats per answer token."""
    nll = answer_nll(model, probe)
    return {"drift": nll - probe.base_nll, "nll": nll, "base_nll": probe.base_nll, "prompts": len(probe.prompts),
            "tokens": probe.tokens}
