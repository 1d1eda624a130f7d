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
torch so that XLA, CUDA and the CPU share it: eager devices loop over the chunks in Python, XLA
runs them as one compiled loop, torch_xla's ``scan``).
"""


from __future__ import annotations

import functools
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
    ``torch.no_grad``) forward computes the loss alone. The chunks run one after another: a
    Python loop on eager devices, one compiled loop on XLA (_scanned_chunks).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows: int, with_grad: bool):
        # with_grad: whether autograd will ask for a gradient; forward always runs with grad mode
        # off, and needs_input_grad does not see an enclosing torch.no_grad
        need_hidden, need_weight = (need and with_grad for need in ctx.needs_input_grad[:2])
        chunks = _scanned_chunks if hidden.device.type == "xla" else _looped_chunks
        total, grad_hidden, grad_weight = chunks(hidden, weight, labels, rows, need_hidden, need_weight)
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


def _chunk(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, with_grad: bool, in_place: bool = True):
    """One chunk of ChunkedLinearCrossEntropy: (its summed loss, a 0-dim float32; the gradient
    of that sum with respect to its logits, (n, V) in h's dtype, or None without ``with_grad``).
    h (n, H), y (n,), weight (V, H). ``in_place``: eagerly, the exponentials and the gradient
    take the logits' own buffer; a traced body (scan's, which traces with gradients on) leaves
    buffers to the compiler."""
    logits = F.linear(h, weight).float()  # (n, V)
    valid = y != IGNORE
    index = y.clamp(min=0).unsqueeze(1)  # (n, 1)
    target = logits.gather(1, index).squeeze(1)  # (n,)
    # log-sum-exp as torch.logsumexp computes it (shifted by the row's maximum), but in the
    # logits' own buffer: no second (n, V) tensor, and the exponentials are the softmax's
    # numerators the gradient needs
    peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    exps = logits.sub_(peak).exp_() if in_place else (logits - peak).exp()
    sums = exps.sum(dim=-1, keepdim=True)  # (n, 1)
    loss = torch.where(valid, (peak + sums.log()).squeeze(1) - target, 0.0).sum()
    if not with_grad:
        return loss, None
    keep = valid.unsqueeze(1).to(exps.dtype)  # (n, 1): ignored rows get no gradient
    if in_place:
        g = exps.div_(sums).scatter_add_(1, index, keep.neg()).mul_(keep)  # softmax - one-hot
    else:
        g = (exps / sums).scatter_add(1, index, keep.neg()) * keep
    return loss, g.to(h.dtype)


def _looped_chunks(hidden, weight, labels, rows: int, need_hidden: bool, need_weight: bool):
    """The chunks one after another in a Python loop (eager devices: each chunk's logits are
    freed before the next chunk's are made): (loss, hidden's gradient or None, weight's or None)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start:start + rows], labels[start:start + rows]
        loss, g = _chunk(h, y, weight, need_hidden or need_weight)
        total = total + loss
        if need_hidden:
            grad_hidden[start:start + rows] = g @ weight.to(hidden.dtype)  # (n, H)
        if need_weight:
            grad_weight += (g.t() @ h).float()  # (V, H)
    return total, grad_hidden, grad_weight


def _scanned_chunks(hidden, weight, labels, rows: int, need_hidden: bool, need_weight: bool):
    """The chunks as one XLA loop (torch_xla's ``scan``, a While whose body is one chunk): traced
    once, and the compiler's plan holds one chunk's logits at a time. A Python loop would be
    unrolled into the graph, where XLA's CPU compiler planned every chunk's logits at once, several
    times this loop's memory (docs/benchmarks.md, "The chunked loss on XLA"). The tokens are padded
    to whole chunks with ignored labels, which carry neither loss nor gradient."""
    from torch_xla.experimental.scan import scan

    n, width = hidden.shape
    count = -(-n // rows)
    pad = count * rows - n
    hidden, weight = hidden.detach(), weight.detach()
    if pad:
        hidden = F.pad(hidden, (0, 0, 0, pad))
        labels = F.pad(labels, (0, pad), value=IGNORE)
    init = (weight, torch.zeros((), dtype=torch.float32, device=hidden.device))
    if need_weight:
        init += (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device),)
    carry, grads = scan(_scan_body(need_hidden, need_weight), init,
                        (hidden.view(count, rows, width), labels.view(count, rows)), is_fn_pure=True)
    grad_hidden = grads.reshape(count * rows, width)[:n] if need_hidden else None
    return carry[1], grad_hidden, carry[2] if need_weight else None


@functools.lru_cache(maxsize=None)
def _scan_body(need_hidden: bool, need_weight: bool):
    """scan's body for these needs: one function object per combination, so that scan's tracing
    cache (keyed by the function) traces it once per shape, not once per step."""

    def body(carry, chunk):
        weight, total = carry[:2]
        h, y = chunk
        loss, g = _chunk(h, y, weight, need_hidden or need_weight, in_place=False)
        carry = (weight, total + loss) + ((carry[2] + (g.t() @ h).float(),) if need_weight else ())
        # scan needs an output per step: hidden's gradient rows, else the chunk's loss
        return carry, g @ weight.to(h.dtype) if need_hidden else loss

    return body


# Chunks below this many tokens stream the whole (V, H) head weight through memory for too few
# rows, and the loss slows down; larger chunks hold more logits at the peak. 256 rather than 512
# for the memory: it lowered the app's peak at SmolLM2's shape (8 x 512) for a small share of the
# update's time (docs/benchmarks.md, "The loss alone, by chunk size", has the figures and commands).
MIN_CHUNK_ROWS = 256
# On XLA each chunk is one iteration of a compiled loop, whose fixed cost small chunks pay many
# times: there 1,024-token chunks beat the unfused loss in time and 256-token ones did not
# (docs/benchmarks.md, "The chunked loss on XLA").
MIN_CHUNK_ROWS_XLA = 1024


def chunk_rows(tokens: int, hidden_size: int, vocab: int, minimum: int = MIN_CHUNK_ROWS) -> int:
    """Tokens per chunk: a power of two such that a chunk's logits are about as large as the
    hidden states already held (Liger-Kernel's rule), but at least ``minimum``, and at most
    ``tokens``."""
    chunks = math.ceil(vocab / hidden_size)
    by_memory = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / chunks))))
    return max(1, min(tokens, max(by_memory, minimum)))


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                rows: Optional[int] = None) -> torch.Tensor:
    """Summed NLL of ``labels`` (N,) under logits ``hidden (N, H) @ weight (V, H)ᵀ``, never holding
    more than ``rows`` tokens' logits (default: chunk_rows)."""
    minimum = MIN_CHUNK_ROWS_XLA if hidden.device.type == "xla" else MIN_CHUNK_ROWS
    rows = rows or chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0], minimum)
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
