"""Sections ``inference`` (base forward vs minilora unmerged vs merged) and ``switching``
(set_adapter on a Llama-3.2-1B-shaped adapter set)."""

from __future__ import annotations

import time

import torch

import minilora

from .models import SHAPES, Settings, build_model, llama_config
from .timing import alternate, device_sync, summary


def bench_inference(settings: Settings, device: torch.device, dtype=torch.float32) -> dict:
    """Forward passes (eval, no grad) of the base model, minilora unmerged and minilora merged.
    The adapter's B is random, so the unmerged adapter really computes something."""
    shape = settings.shape
    models = {"base": build_model("base", 0.0, shape, settings.seed, device, dtype)}
    for name in ("unmerged", "merged"):
        model = build_model("minilora", 0.0, shape, settings.seed, device, dtype)
        g = torch.Generator().manual_seed(settings.seed + 1)
        with torch.no_grad():
            for key, p in minilora.lora_parameters(model):
                if key.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        if name == "merged":
            minilora.merge(model)
        models[name] = model.eval()
    models["base"].eval()
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def forward(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        return run

    samples = alternate({k: forward(m) for k, m in models.items()}, settings.inference_rounds, 1, device_sync(device))
    rows = {k: summary(v) for k, v in samples.items()}
    base = rows["base"]["median"]
    for row in rows.values():
        row["vs_base"] = row["median"] / base
    return {"device": str(device), "rows": rows}


def bench_switching(settings: Settings) -> dict:
    """``set_adapter`` cycling through adapters of a Llama-3.2-1B-shaped model.

    The base model is built on the meta device (its 1.24B weights are never needed to switch);
    the adapters are real CPU tensors with random values: r=16 on the seven projections of all
    16 layers, 11.27M parameters per adapter. Also measured: one walk of the module tree to find
    the adapted Linears, the per-layer pointer swap alone (what set_adapter does once it has
    them), and that switching runs no tensor op and leaves every parameter object and storage
    as it was.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(SHAPES["llama-1b"]))
    names = [f"adapter{i}" for i in range(settings.switch_adapters)]
    for name in names:
        minilora.inject(model, r=16, alpha=32, adapter_name=name)
    g = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        for _, layer in minilora.lora_modules(model):
            for adapter in layer.adapters.values():
                adapter.to_empty(device="cpu")  # real storage for the adapter only (its scale buffer too)
                adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * 0.02)
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.02)
                adapter.scale.fill_(adapter.scaling)
    per_adapter = sum(p.numel() for _, p in minilora.lora_parameters(model, names[0]))

    def parameters():
        return [(n, id(p), p.data_ptr()) for n, p in model.named_parameters() if p.device.type != "meta"]

    class OpCounter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            OpCounter.ops += 1
            return func(*args, **(kwargs or {}))

    before = parameters()
    calls = []
    with OpCounter():
        for i in range(settings.switch_rounds):
            start = time.perf_counter()
            minilora.set_adapter(model, names[i % len(names)])
            calls.append(time.perf_counter() - start)
    unchanged = parameters() == before
    walks = []
    for _ in range(settings.switch_rounds):
        start = time.perf_counter()
        layers = [m for m in model.modules() if isinstance(m, minilora.LoRALinear)]
        walks.append(time.perf_counter() - start)
    swaps = []
    for i in range(settings.switch_rounds):
        start = time.perf_counter()
        for layer in layers:
            layer.active_adapter = names[i % len(names)]
        swaps.append(time.perf_counter() - start)
    return {"adapters": len(names), "params_per_adapter": per_adapter, "lora_layers": len(layers),
            "modules": sum(1 for _ in model.named_modules()),
            "set_adapter": summary(calls), "module_walk": summary(walks), "pointer_swap": summary(swaps),
            "tensor_ops_during_switch": OpCounter.ops, "parameters_unchanged": unchanged}
