"""Section ``gguf``: minilora LoRA's step on the demo's real base, SmolLM2-135M-Instruct, held as the
GGUF file's own Q4_1 blocks (``--quantize gguf``) against the same weights as a plain bfloat16 (or
float32) model (what the app trains on without --quantize), alternated on the eager CPU; all
layers and the demo's top 8. The block base dequantizes each Linear in forward and again in
backward: that is what the section times. Weight bytes of both, for the memory side."""

from __future__ import annotations

import copy

import torch

from .models import Settings
from .timing import alternate, summary

TOP_LAYERS = 8  # the demo's --lora_top_layers


def bench_gguf(settings: Settings, threads: int) -> dict:
    import minilora
    from minilora.quant import weight_bytes
    from minilora_train.base_model import packaged_smollm2
    from minilora_train.device import cpu_has_native_bf16
    from minilora_train.gguf_base import load_gguf_base, read_header, tensor_bytes

    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # what the demo computes in
    path = packaged_smollm2()
    blocks, _ = load_gguf_base(path, dtype)
    plain = minilora.dequantize(copy.deepcopy(blocks))  # the same numbers as nn.Linear / nn.Embedding weights
    layers = blocks.config.num_hidden_layers
    shape = settings.shape
    g = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, blocks.config.vocab_size, (shape.batch, shape.seq), generator=g)  # (B, L)
    steps, rows = {}, []
    for depth, top in (("all layers", layers), (f"top {TOP_LAYERS} layers", TOP_LAYERS)):
        for base, model in (("plain weights", plain), ("GGUF Q4_1 blocks", blocks)):
            adapted = copy.deepcopy(model)
            minilora.inject(adapted, r=shape.r, alpha=shape.alpha, target_modules=minilora.LLAMA_TARGETS,
                            layers_to_transform=list(range(layers - top, layers)))
            adapted.train()
            optimizer = torch.optim.AdamW([p for _, p in minilora.lora_parameters(adapted)], lr=1e-4)

            def step(model=adapted, optimizer=optimizer) -> None:
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            label = f"{base}, {depth}"
            steps[label] = step
            rows.append({"label": label, "top_layers": top, "weight_bytes": weight_bytes(model)})
    samples = alternate(steps, settings.rounds, settings.warmup)
    for row in rows:
        row.update(summary(samples[row["label"]]))
        plain_row = next(r for r in rows if r["top_layers"] == row["top_layers"] and r["label"].startswith("plain"))
        row["vs_plain"] = row["median"] / summary(samples[plain_row["label"]])["median"]
    return {"rows": rows, "file": path.name, "file_tensor_bytes": tensor_bytes(read_header(path)),
            "compute_dtype": str(dtype).replace("torch.", ""), "threads": threads,
            "tokens_per_step": shape.batch * shape.seq}
