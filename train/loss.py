"""The loss training minimises and evaluation reports: the summed negative log-likelihood of
each next token, with -100 (``IGNORE``) marking labels that carry none (padding, prompts under
--train_on_responses_only, the first position of every window)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over predicted tokens of -log p(next token), a 0-dim float32 tensor (what training
    minimises and evaluation reports). logits (B, L, V): position t predicts ``labels[:, t + 1]``;
    labels (B, L), -100 where nothing is predicted."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")


def predicted_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens of a (B, L) label batch carry loss (the first position predicts nothing):
    a 0-dim int64 tensor on the labels' device."""
    return (labels[:, 1:] != IGNORE).sum()


def nll_result(nll: float, tokens: int) -> dict:
    """``{"loss": nll / tokens (nats per token), "perplexity": exp(loss), "tokens": tokens}``;
    loss nan when no token was predicted, perplexity inf past float range."""
    loss = nll / tokens if tokens else math.nan
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens}
