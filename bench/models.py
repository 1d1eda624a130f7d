"""What the benchmark measures: the Llama shapes, the settings, the contenders' models and step."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

import minilora
import minilora.dropout


@dataclass(frozen=True)
class Shape:
    """A Llama (random weights) and its batch: what the training and inference sections run."""

    layers: int = 6
    hidden: int = 512
    intermediate: int = 1376
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 8192
    batch: int = 4
    seq: int = 256
    r: int = 16
    alpha: int = 32
    tied: int = 0  # 1: the LM head shares the embedding's weight (Llama-3.2-1B, SmolLM2)


# Named shapes for ``--shape NAME[,FIELD=INT...]``, from each model's config.json.
SHAPES = {
    # meta-llama/Llama-3.2-1B (head_dim 64 = hidden / heads)
    "llama-1b": Shape(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tied=1,
                      batch=8, seq=2048),
    # HuggingFaceTB/SmolLM2-135M(-Instruct), the demo's real base (head_dim 64)
    "smollm2-135m": Shape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, tied=1,
                          batch=8, seq=128),
}


@dataclass
class Settings:
    shape: Shape = field(default_factory=Shape)
    dropouts: tuple = (0.0, 0.05)  # the app's default dropout
    rounds: int = 7              # alternated samples per contender (training)
    warmup: int = 2              # untimed steps per contender first (the first allocates AdamW state)
    inference_rounds: int = 9
    memory_steps: int = 2        # steps per contender in its memory subprocess
    switch_adapters: int = 4     # adapters in the 1B-shaped set
    switch_rounds: int = 40
    xla_updates: int = 14        # updates of the XLA / eager loop runs (2 of them warm-up)
    loop_updates: int = 8        # updates of the app-loop vs bare-loop runs (2 of them warm-up)
    loop_rounds: int = 2         # runs of each loop contender, in rotating order
    loop_rows: tuple = ("app", "app-full", "bare")  # the loop section's contenders (loop.LOOP_ROWS)
    packing_records: Optional[int] = None  # medquad records to pack (None: all)
    # the multi section: SmolLM2-135M's shape, r 16 on the seven projections; a batch of
    # max(multi_rows, n) rows over n distinct adapters for each n of multi_mixes, all loaded at once
    multi_shape: Shape = field(default_factory=lambda: SHAPES["smollm2-135m"])
    multi_mixes: tuple = (1, 4, 16, 64)
    multi_rows: int = 32
    multi_tokens: int = 32       # prefill tokens a row, and the decode step's KV cache
    seed: int = 0


QUICK = dict(shape=Shape(layers=2, hidden=256, intermediate=688, heads=4, kv_heads=2, vocab=4096, batch=2, seq=128),
             rounds=3, warmup=1, inference_rounds=5, switch_adapters=2, switch_rounds=10, xla_updates=10,
             loop_updates=4, loop_rounds=1, packing_records=2000,
             multi_shape=dataclasses.replace(SHAPES["smollm2-135m"], layers=2, vocab=4096), multi_mixes=(1, 4, 16))


def parse_shape(text: str, base: Shape) -> Shape:
    """``NAME`` of SHAPES and/or ``FIELD=INT`` overrides, comma-separated, over ``base``.
    Raises ValueError with what was expected."""
    shape, changes = base, {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if "=" not in item:
            if item not in SHAPES:
                raise ValueError(f"unknown shape {item!r}; named shapes: {', '.join(SHAPES)}")
            shape = SHAPES[item]
            continue
        key, value = item.split("=", 1)
        changes[key.strip()] = int(value)
    try:
        return dataclasses.replace(shape, **changes)
    except TypeError as e:
        fields = ", ".join(f.name for f in dataclasses.fields(Shape))
        raise ValueError(f"{e} (fields: {fields})") from None


# -- models and steps ---------------------------------------------------------------------------

def llama_config(shape: Shape, **overrides):
    """The one LlamaConfig builder of the benchmark (``overrides``: token ids and the like)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, head_dim=shape.hidden // shape.heads,
                       max_position_embeddings=shape.seq, tie_word_embeddings=bool(shape.tied),
                       **overrides)


def build_model(kind: str, dropout: float, shape: Shape, seed: int, device: torch.device, dtype=torch.float32,
                top_layers: int = 0):
    """``kind``: base (no adapter), minilora, peft or full. The same seed gives every contender
    the same base weights; LoRA contenders get the same r, alpha, dropout and targets.
    ``top_layers`` > 0: minilora's adapters on the last that many decoder layers only (the app's
    --lora_top_layers; backward then stops at the lowest adapted layer)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    # Built where it runs: a 1B-shaped model's random init takes seconds on a GPU, minutes on a CPU.
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape)).to(dtype)
    if kind == "minilora":
        layers = list(range(shape.layers - top_layers, shape.layers)) if top_layers else None
        minilora.inject(model, r=shape.r, alpha=shape.alpha, dropout=dropout, target_modules=minilora.LLAMA_TARGETS,
                        layers_to_transform=layers)
    elif kind == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=dropout,
                                                           target_modules=list(minilora.LLAMA_TARGETS), bias="none"))
    return model.to(device)

# The two ways minilora draws a dropout mask on a CPU (minilora.dropout.dropout_mask): "words"
# (16-bit uniforms from 64-bit random words, where ATen's bernoulli_ is a scalar loop: AMD CPUs)
# and "bernoulli" (bernoulli_, which ATen hands to MKL on Intel CPUs). None: this machine's own.
MASK_PATHS = ("words", "bernoulli")


def native_mask_path() -> str:
    """The mask path minilora takes on this machine's CPU."""
    return "bernoulli" if minilora.dropout.cpu_bernoulli_is_vectorised() else "words"


@contextlib.contextmanager
def mask_path(path: Optional[str]):
    """Within the block, minilora draws CPU dropout masks by ``path`` (see MASK_PATHS), whatever the
    CPU; the tests force the paths the same way. On an AMD CPU "bernoulli" is ATen's scalar loop,
    not MKL's kernel: it runs minilora's Intel code path, at this CPU's bernoulli_ speed."""
    if path is None:
        yield
        return
    if path not in MASK_PATHS:
        raise ValueError(f"unknown mask path {path!r}; choose from {', '.join(MASK_PATHS)}")
    own = minilora.dropout.cpu_bernoulli_is_vectorised
    minilora.dropout.cpu_bernoulli_is_vectorised = lambda: path == "bernoulli"
    try:
        yield
    finally:
        minilora.dropout.cpu_bernoulli_is_vectorised = own


class Trainer:
    """One contender's model, AdamW and batch; ``step()`` is one training update.

    ``dtype``: the base's weights (adapters stay float32, as the app keeps them); ``autocast``:
    bfloat16 autocast over them (CPU or CUDA); ``top_layers``: see build_model; ``mask``: the
    CPU dropout-mask path (see mask_path)."""

    def __init__(self, kind: str, dropout: float, shape: Shape, seed: int, device: torch.device, dtype=torch.float32,
                 autocast: bool = False, top_layers: int = 0, mask: Optional[str] = None):
        self.model = build_model(kind, dropout, shape, seed, device, dtype, top_layers).train()
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
        self.mask = mask
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=1e-4, weight_decay=0.01)
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)  # (B, L)

    def step(self) -> None:
        with mask_path(self.mask), self.autocast:
            loss = self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def step_flops(kind: str, shape: Shape) -> float:
    """Model FLOPs of one training step: 2 per multiply-add in forward, twice that again in backward
    for full fine-tuning (input and weight gradients), once again for LoRA (input gradients only;
    the adapters' own products are counted too). Attention scores count as in the PaLM paper."""
    s = shape
    head = s.hidden // s.heads
    per_layer = s.hidden * (2 * s.hidden + 2 * s.kv_heads * head) + 3 * s.hidden * s.intermediate
    dense = s.layers * per_layer + s.vocab * s.hidden  # Linear weights, lm_head included
    lora = s.layers * s.r * sum(i + o for i, o in [(s.hidden, s.hidden)] * 2 + [(s.hidden, s.kv_heads * head)] * 2
                                + [(s.hidden, s.intermediate)] * 2 + [(s.intermediate, s.hidden)])
    tokens = s.batch * s.seq
    attention = 12 * s.layers * s.hidden * s.seq * tokens  # forward 4·l·h·L per token, backward twice that
    if kind == "full":
        return 6 * dense * tokens + attention
    return 4 * dense * tokens + 6 * lora * tokens + attention

