"""Section ``multi``: a batch whose rows use different adapters, minilora's stacked slots
(``minilora.mixed_batch``) against PEFT's ``adapter_names=`` mixed batch, against the same batch
through one active adapter with every adapter loaded, and against the base alone. Decode (one new
token a row over a KV cache of ``multi_tokens`` tokens) and prefill (``multi_tokens`` tokens a row)."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

import minilora

from .models import Settings, Shape, build_model
from .timing import alternate, device_sync, summary
from .training import has_peft


def adapter_names(count: int) -> list[str]:
    return [f"adapter{i}" for i in range(count)]


def build_minilora(shape: Shape, adapters: int, seed: int, device: torch.device, dtype) -> torch.nn.Module:
    """The base with ``adapters`` adapters (r and alpha of ``shape``, the seven projections), every
    tensor random, all frozen as load_adapter leaves them; in eval mode."""
    model = build_model("base", 0.0, shape, seed, device, dtype)
    for name in adapter_names(adapters):
        minilora.inject(model, r=shape.r, alpha=shape.alpha, target_modules=minilora.LLAMA_TARGETS, adapter_name=name)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in minilora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.requires_grad_(False).eval()


def build_peft(ours: torch.nn.Module, shape: Shape, adapters: int, seed: int, device: torch.device, dtype):
    """PEFT's model of the same base holding the same adapters, tensor for tensor."""
    import peft

    config = dict(r=shape.r, lora_alpha=shape.alpha, target_modules=list(minilora.LLAMA_TARGETS), bias="none")
    names = adapter_names(adapters)
    model = peft.get_peft_model(build_model("base", 0.0, shape, seed, device, dtype), peft.LoraConfig(**config),
                                adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**config))
    with torch.no_grad():
        for path, layer in minilora.lora_modules(ours):
            theirs = model.base_model.model.get_submodule(path)
            for name, adapter in layer.adapters.items():
                theirs.lora_A[name].weight.copy_(adapter.lora_A)
                theirs.lora_B[name].weight.copy_(adapter.lora_B)
    return model.requires_grad_(False).eval()


class Contender:
    """One way to run the batch: ``around()`` is entered (untimed) around every timed call, as a
    generation enters it once around all its steps; ``forward`` is the model to call inside it."""

    def __init__(self, forward, around=contextlib.nullcontext):
        self.forward, self.around = forward, around
        self.cache = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt (B, P) through the model, the last token's logits only, as generate's prefill
        computes them: (B, 1, vocab)."""
        return self.forward(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    def start_decoding(self, ids: torch.Tensor) -> None:
        """Fill a KV cache with ``ids`` (B, P): what every timed decode step continues from."""
        from transformers import DynamicCache

        self.cache = DynamicCache()
        with self.around():
            self.forward(input_ids=ids, cache=self.cache, use_cache=True)

    def decode(self, ids: torch.Tensor) -> None:
        """One token a row (B, 1) over the cache, which is cut back afterwards for the next call."""
        self.forward(input_ids=ids, cache=self.cache, use_cache=True)
        self.cache.crop(-1)  # transformers 5: a negative count of tokens to remove


def timed(contenders: dict[str, Contender], call, rounds: int, sync) -> dict[str, dict]:
    """Median seconds of ``call(contender)``, alternated, each call inside the contender's ``around``."""
    def run(c):
        def once():
            with c.around():
                sync()
                start = time.perf_counter()
                call(c)
                sync()
                once.seconds.append(time.perf_counter() - start)
        once.seconds = []
        return once

    runs = {name: run(c) for name, c in contenders.items()}
    alternate(runs, rounds, 1)
    return {name: summary(r.seconds[1:]) for name, r in runs.items()}  # the first is the warm-up call


def bench_multi(settings: Settings, device: torch.device, dtype=torch.float32) -> dict:
    """Per number of distinct adapters in the batch (``multi_mixes``; rows = max(multi_rows, that
    number), row i using adapter i mod that number): decode and prefill time of minilora's mixed
    batch, PEFT's, minilora with one active adapter on the same rows, and the base with no adapter
    (the floor of any way to add adapters to it)."""
    shape, total, tokens = settings.multi_shape, max(settings.multi_mixes), settings.multi_tokens
    ours = build_minilora(shape, total, settings.seed, device, dtype)
    theirs = build_peft(ours, shape, total, settings.seed, device, dtype) if has_peft() else None
    sync = device_sync(device)
    g = torch.Generator().manual_seed(settings.seed + 2)
    out = []
    for mix in settings.multi_mixes:
        rows = max(settings.multi_rows, mix)
        names = [adapter_names(mix)[i % mix] for i in range(rows)]
        prompt = torch.randint(0, shape.vocab, (rows, tokens), generator=g).to(device)  # (B, P)
        step = torch.randint(0, shape.vocab, (rows, 1), generator=g).to(device)  # (B, 1)
        contenders = {"minilora": Contender(ours, lambda: minilora.mixed_batch(ours, names)),
                      "one adapter": Contender(ours),
                      # the floor no adapter implementation can go under: the base's own forward
                      "no adapter": Contender(ours, lambda: minilora.disable_adapters(ours))}
        if theirs is not None:
            contenders["PEFT"] = Contender(theirs.get_base_model(),
                                           lambda: theirs._enable_peft_forward_hooks(adapter_names=names))
        minilora.set_adapter(ours, "adapter0")
        with torch.inference_mode():
            logits = {}
            for name, c in contenders.items():
                with c.around():
                    logits[name] = c.prefill(prompt)
            for c in contenders.values():
                c.start_decoding(prompt)
            decode = timed(contenders, lambda c: c.decode(step), settings.inference_rounds, sync)
            prefill = timed(contenders, lambda c: c.prefill(prompt), settings.inference_rounds, sync)
        enter = []
        for _ in range(3):
            start = time.perf_counter()
            with minilora.mixed_batch(ours, names):
                pass
            enter.append(time.perf_counter() - start)
        row = {"adapters": mix, "rows": rows, "decode": decode, "prefill": prefill,
               "mixed_batch_enter_seconds": min(enter)}
        if "PEFT" in logits:  # the same adapters give the same logits through either library
            row["max_abs_logit_diff_vs_peft"] = (logits["minilora"] - logits["PEFT"]).abs().max().item()
        for phase, per_call in (("decode", 1), ("prefill", tokens)):
            times = row[phase]
            times["tokens_per_second"] = {k: rows * per_call / v["median"] for k, v in times.items()}
            if "PEFT" in times:
                times["minilora_vs_peft"] = times["minilora"]["median"] / times["PEFT"]["median"]
                times["no_adapter_vs_peft"] = times["no adapter"]["median"] / times["PEFT"]["median"]
            times["minilora_vs_one_adapter"] = times["minilora"]["median"] / times["one adapter"]["median"]
            times["minilora_vs_no_adapter"] = times["minilora"]["median"] / times["no adapter"]["median"]
        out.append(row)
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "shape": dataclasses.asdict(shape),
            "adapters_loaded": total, "tokens": tokens, "peft": theirs is not None, "rows": out}
