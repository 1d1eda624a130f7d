"""Question/answer records through a tokenizer's chat template (``--chat_template``).

An instruct model (SmolLM2-135M-Instruct, Llama-3.2-1B-Instruct, ...) was tuned on conversations
rendered by its chat template; fine-tuning and prompting it in the same form keeps what it learnt.
A record becomes the rendered conversation [user: question, assistant: answer], cut where the
assistant's turn starts: the prompt is exactly what ``chat_prompt`` gives at inference time, and
the response is the answer plus the template's end-of-turn text (``<|im_end|>\\n`` for SmolLM2),
so a model trained on it learns to stop.
"""

from __future__ import annotations

from typing import Optional

from .config import UsageError


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UsageError(f"--chat_template: the tokenizer {name} has no chat template; use an instruct model's "
                         "tokenizer, or leave --chat_template off to use the '### Question:' template")


def user_message(question: str, context: Optional[str] = None) -> str:
    """The user's turn: the question, after its context when the record has one."""
    return f"{context.strip()}\n\n{question.strip()}" if context and context.strip() else question.strip()


def chat_prompt(tokenizer, question: str, context: Optional[str] = None) -> str:
    """The conversation up to where the assistant starts answering (a string, special tokens as text)."""
    _require_template(tokenizer)
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message(question, context)}],
                                         tokenize=False, add_generation_prompt=True)


def chat_parts(tokenizer, question: str, context: Optional[str], answer: str) -> tuple[str, str]:
    """(prompt, response) of one record: prompt + response is the whole rendered conversation."""
    prompt = chat_prompt(tokenizer, question, context)
    whole = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(question, context)}, {"role": "assistant", "content": answer.strip()}],
        tokenize=False)
    if not whole.startswith(prompt):
        # Templates that rewrite earlier turns once an answer follows (some drop a reasoning block) cannot be
        # split into a prompt the model will see at inference and a response to learn.
        raise UsageError("--chat_template: this tokenizer's template renders the question differently once an "
                         "answer follows it, so the answer tokens cannot be told apart; leave --chat_template off")
    return prompt, whole[len(prompt):]
