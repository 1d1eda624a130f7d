"""The base's own answers to everyday instructions: what the chat-drift probe scores and what the
forgetting guard trains on (self-distillation).

Answers are greedy, through the tokenizer's chat template, and cached on disk under
``~/.cache/minilora/answers/`` (``$XDG_CACHE_HOME/minilora``), next to the converted bases:
generating them is the slowest part of a short run's set-up, and the same base answers the same
prompts the same way every time. The cache key covers everything the answers depend on: the
weights themselves (a digest of every tensor, so a retrained or re-quantized folder under the same
name gets new answers), the templated prompts, the stop tokens, the answer length, the device type
and the torch and transformers versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..inference import eval_mode, model_device, pad_rows

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
PROMPTS_FILE = os.path.join(ASSETS, "general_prompts.jsonl")  # scored by the chat-drift probe
DISTILL_PROMPTS_FILE = os.path.join(ASSETS, "distill_prompts.jsonl")  # trained on by the guard; disjoint from the above


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


def templated(tokenizer, prompt: str) -> list[int]:
    """``prompt`` as a user turn through the chat template, ending where the assistant's turn starts."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _stop_ids(model, tokenizer) -> set:
    configured = getattr(model.generation_config, "eos_token_id", None)  # an id, a list of ids, or None
    return {tokenizer.eos_token_id, *(configured if isinstance(configured, (list, tuple)) else [configured])}


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
    stop_ids = _stop_ids(model, tokenizer)
    prompt_ids = [templated(tokenizer, p) for p in prompts]
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


def fingerprint(model) -> str:
    """A digest of every parameter and buffer (names, dtypes, shapes, bytes): the same weights give
    the same digest wherever they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class Answers:
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    seconds: float  # what generating them took (when they were generated, not read back)
    cached: bool    # read from the disk cache in this run

    @property
    def pairs(self) -> list[list[list[int]]]:
        return [[p, a] for p, a in zip(self.prompt_ids, self.answer_ids)]


def cache_dir() -> str:
    from ..base_model import default_cache_root

    return os.path.join(default_cache_root(), "answers")


def base_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, weights: str,
                 batch_size: int = 20) -> Answers:
    """``greedy_answers``, read from the disk cache when this very model (``weights``: its
    ``fingerprint``, plus anything done to it since, such as a quantization) has answered these
    prompts before; written there otherwise."""
    import transformers

    prompt_ids = [templated(tokenizer, p) for p in prompts] if has_chat_template(tokenizer) else None
    if prompt_ids is None:
        raise ValueError("chat drift needs an instruct base: this tokenizer has no chat template")
    key = hashlib.sha256(json.dumps({
        "weights": weights, "prompts": prompt_ids, "stop": sorted(i for i in _stop_ids(model, tokenizer) if i is not None),
        "max_new_tokens": max_new_tokens, "device": model_device(model).type, "torch": torch.__version__,
        "transformers": transformers.__version__}).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir(), f"{key}.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved["prompt_ids"] == prompt_ids:
            return Answers(saved["prompt_ids"], saved["answer_ids"], float(saved["seconds"]), cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not there, or torn by a kill: answer again
    started = time.time()
    prompt_ids, answer_ids = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    answers = Answers(prompt_ids, answer_ids, time.time() - started, cached=False)
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # written aside, then renamed: a reader never sees half a file
        with open(tmp, "w") as f:
            json.dump({"prompt_ids": prompt_ids, "answer_ids": answer_ids, "seconds": answers.seconds}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the run goes on, the next one answers again
    return answers
