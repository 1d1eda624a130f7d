"""The loss training minimises and evaluation reports: the summed negative log-likelihood of
each next token, with -100 (``IGNORE``) marking labels that carry none (padding, prompts under
--train_on_responses_only, the first position of every window).

With the LM head and cross-entropy fused over chunks of tokens (``ChunkedLinearCrossEntropy``,
the app's default) the full (tokens, vocabulary) logits are never held. At SmolLM2's vocabulary
(49,152) and 8 x 512 tokens the float32 logits are 805 MB, their log-softmax as much again, and
their gradient as much again; Llama-3.2's 128,256 words at 8 x 2048 make that 8.4 GB each. The
chunked node computes the head's product, the log-sum-exp and the target logit chunk by chunk,
and, when training, turns each chunk's logits into their gradient right there, so that only the
hidden states' gradient is kept for backward (Liger-Kernel's fused linear cross-entropy, in pure
torch so that XLA, CUDA and the CPU share it).
"""


from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE = -100


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over predicted tokens of -log p(next token), a 0-dim float32 tensor (what training
    minimises and evaluation reports). logits (B, L, V): position t predicts ``labels[:, t + 1]``;
    labels (B, L), -100 where nothing is predicted."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, L): shift the labels, not copy the logits
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE, reduction="sum")


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


# Model types whose causal-LM forward is exactly ``lm_head(decoder(...).last_hidden_state)``:
# no logit scaling or soft-capping, so the chunked path computes the same loss.
HEAD_IS_PLAIN_LINEAR = {"llama", "mistral", "qwen2", "qwen3"}


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum over rows with label != IGNORE of logsumexp(h Wᵀ) - (h Wᵀ)[label]`` as one autograd
    node. Shapes: hidden (N, H), weight (V, H), labels (N,) int64; returns a 0-dim float32.

    Logits are computed in hidden's dtype (as the LM head does) and reduced in float32, ``rows``
    tokens at a time. The loss is a sum whose gradient is known once each chunk's logits are:
    their softmax minus the one-hot target. So forward, when a gradient will be asked for, turns
    each chunk's logits into that gradient in place (cast to hidden's dtype, as the unfused path's
    ``.float()`` casts it) and multiplies it into hidden's gradient (N, H) and the weight's
    (accumulated over chunks in float32) at once, as Liger-Kernel's fused linear cross-entropy
    does; backward only scales them by the incoming gradient. No logits are recomputed, and
    only those gradients are kept between forward and backward. Without a gradient (evaluation,
    ``torch.no_grad``) forward computes the loss alone.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows: int, with_grad: bool):
        # with_grad: whether autograd will ask for a gradient; forward always runs with grad mode
        # off, and needs_input_grad does not see an enclosing torch.no_grad
        need_hidden, need_weight = (need and with_grad for need in ctx.needs_input_grad[:2])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], labels[start:start + rows]
            logits = F.linear(h, weight).float()  # (n, V)
            valid = y != IGNORE
            target = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)  # (n,)
            # log-sum-exp as torch.logsumexp computes it (shifted by the row's maximum), but in
            # the logits' own buffer: no second (n, V) tensor, and the exponentials are the
            # softmax's numerators the gradient needs
            peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            exps = logits.sub_(peak).exp_()
            sums = exps.sum(dim=-1, keepdim=True)  # (n, 1)
            lse = (peak + sums.log()).squeeze(1)
            total = total + torch.where(valid, lse - target, 0.0).sum()
            if not (need_hidden or need_weight):
                continue
            g = exps.div_(sums)  # the softmax
            g.scatter_add_(1, y.clamp(min=0).unsqueeze(1), valid.unsqueeze(1).to(g.dtype).neg())  # - one-hot
            g.mul_(valid.unsqueeze(1).to(g.dtype))  # ignored rows: no gradient
            g = g.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:start + rows] = g @ weight.to(hidden.dtype)  # (n, H)
            if need_weight:
                grad_weight += (g.t() @ h).float()  # (V, H)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


# Chunks below this many tokens stream the whole (V, H) head weight through memory for too few
# rows: at SmolLM2's head on 2 CPU cores, 1,024 tokens took 2.62 s in 16-token chunks, 1.02 s in
# 128, 0.94 s in 256, 0.87 s in 512, against 1.01 s unfused; 4,096 tokens 3.73 s in 256 and 3.50 s
# in 512 (4.09 s unfused), at 757 against 856 MiB peak RSS (forward and backward, alternated,
# 2 threads: scripts/cpu_probes.py loss). 256 rather than 512 for the memory: the app's update at
# 8 x 512 peaked at 0.83 of full logits' RSS instead of 0.85, for the loss probe's 0.23 s more
# of a 24-s update
# (docs/benchmarks.md, "SmolLM2's shape on two CPU cores").
MIN_CHUNK_ROWS = 256


def chunk_rows(tokens: int, hidden_size: int, vocab: int) -> int:
    """Tokens per chunk: a power of two such that a chunk's logits are about as large as the
    hidden states already held (Liger-Kernel's rule), but at least MIN_CHUNK_ROWS, and at most
    ``tokens``."""
    chunks = math.ceil(vocab / hidden_size)
    by_memory = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / chunks))))
    return max(1, min(tokens, max(by_memory, MIN_CHUNK_ROWS)))


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                rows: Optional[int] = None) -> torch.Tensor:
    """Summed NLL of ``labels`` (N,) under logits ``hidden (N, H) @ weight (V, H)ᵀ``, never holding
    more than ``rows`` tokens' logits (default: chunk_rows)."""
    rows = rows or chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0])
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, rows, with_grad)


def fusable(model) -> bool:
    """Whether ``model`` lets the loss take its last hidden states and LM head apart: a transformers
    causal LM itself (not inside a DDP, FSDP or PEFT wrapper, whose forward must run) whose head
    is a bias-free Linear applied as is, with a plain weight (FSDP2 shards it into a DTensor,
    gathered only by the head's own forward)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    head = model.get_output_embeddings()
    return (isinstance(head, torch.nn.Linear) and head.bias is None
            and getattr(model.config, "model_type", None) in HEAD_IS_PLAIN_LINEAR
            and type(head.weight.data) is torch.Tensor)


def summed_nll(model, ids: torch.Tensor, labels: torch.Tensor, attention_mask=None,
               chunked: bool = True) -> torch.Tensor:
    """Sum over predicted tokens of -log p(next token) for a (B, L) batch: a 0-dim float32.

    Position t predicts labels[t + 1]; IGNORE labels carry no loss. ``chunked`` (and a model
    that allows it, see fusable): the LM head and the loss over chunks of tokens; otherwise
    the model's full (B, L, V) logits, with the labels shifted rather than the logits copied.
    """
    if chunked and fusable(model):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(L-1), H)
        return chunked_nll(hidden, model.get_output_embeddings().weight, labels[:, 1:].reshape(-1))
    return next_token_nll(model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits, labels)


def module_called(model, chunked: bool = True) -> torch.nn.Module:
    """The module whose forward ``summed_nll`` calls: the decoder for the chunked loss, else the
    whole model (what --compile compiles; the chunked loss itself stays eager, its chunks are
    GEMMs already)."""
    return model.get_decoder() if chunked and fusable(model) else model
