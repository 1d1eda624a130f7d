"""The CUDA checks the CPU-only test suite cannot make: run on a machine with one NVIDIA GPU.

    python scripts/gpu_check.py OUT_DIR

Trains through the real CLI on ``--device cuda`` (LoRA in bf16 and full fine-tuning of a model
with tied embeddings), reloads the adapter with ``load_lora_model`` on the GPU and generates, and
checks what the CPU suite checks on CPU: the adapter matches a CPU forward, merged equals
unmerged, the saved full model has one embedding matrix. Prints one JSON line per check and
writes them all to OUT_DIR/gpu_check.json (the runs themselves go to a temporary directory); exits 1 if any check failed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

import torch

DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")  # "cpu": a dry run of this script
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from conftest import make_tokenizer, medical_sentences, tiny_llama, write_jsonl  # noqa: E402


def small_model_dir(path: str, tie: bool) -> str:
    tokenizer = make_tokenizer(path, vocab_size=512)
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie)
    model.save_pretrained(path)
    return path


def train(argv: list[str]) -> dict:
    from minilora_train.cli import main

    started = time.time()
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"minilora-train exited {code}")
    with open(os.path.join(argv[argv.index("--output_dir") + 1], "train_summary.json")) as f:
        summary = json.load(f)
    return {"seconds": round(time.time() - started, 1), "device": summary["device"],
            "steps_per_second": summary["steps_per_second"], "peak_memory_bytes": summary["peak_memory_bytes"],
            "base_ppl": summary["base"]["validation"]["perplexity"],
            "final_ppl": summary["final"]["validation"]["perplexity"]}


def main(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="minilora-gpu-check-")  # only the JSON goes to OUT_DIR
    results, failed = [], False
    data = write_jsonl(os.path.join(work, "data.jsonl"), [{"text": t} for t in medical_sentences(3000)])
    common = ["--dataset_dir", data, "--device", DEV, "--max_seq_length", "128", "--per_device_train_batch_size", "16",
              "--max_steps", os.environ.get("GPU_CHECK_STEPS", "60"), "--logging_steps", "20", "--eval_steps", "30", "--max_eval_samples", "64",
              "--report_to", "none", "--save_epoch_percentage", "0", "--general_eval_dataset", "none"]

    def check(name, fn):
        nonlocal failed
        try:
            result = {"check": name, "ok": True, **(fn() or {})}
        except Exception as e:  # a failed check is reported; the others still run
            failed = True
            result = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                      "trace": traceback.format_exc()[-2000:]}
        print(json.dumps(result), flush=True)
        results.append(result)

    lora_model = small_model_dir(os.path.join(work, "untied"), tie=False)
    tied_model = small_model_dir(os.path.join(work, "tied"), tie=True)
    lora_out = os.path.join(work, "lora")

    check("lora_bf16_cli", lambda: train(["--model_name", lora_model, "--output_dir", lora_out, "--use_lora",
                                          "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.1",
                                          "--learning_rate", "2e-3", "--bf16", *common]))
    check("lora_fp32_cli", lambda: train(["--model_name", lora_model, "--output_dir", os.path.join(work, "lora32"),
                                          "--use_lora", "--lora_r", "16", "--learning_rate", "2e-3", *common]))

    def full_tied():
        summary = train(["--model_name", tied_model, "--output_dir", os.path.join(work, "full"), "--learning_rate",
                         "1e-3", *common])
        from safetensors.torch import load_file

        saved = load_file(os.path.join(work, "full", "model.safetensors"))
        head = saved.get("lm_head.weight", saved["model.embed_tokens.weight"])
        assert torch.equal(head, saved["model.embed_tokens.weight"]), "tied embedding saved as two matrices"
        return summary

    check("full_tied_cli", full_tied)

    def reload_and_generate():
        from minilora_train.inference import generate_text, load_lora_model

        model, tokenizer = load_lora_model(lora_model, lora_out, device=DEV)
        merged, _ = load_lora_model(lora_model, lora_out, device=DEV, merge=True)
        cpu, _ = load_lora_model(lora_model, lora_out, device="cpu")
        prompt = "patient with fever and"
        a = generate_text(model, tokenizer, prompt, max_new_tokens=20, do_sample=False)
        b = generate_text(merged, tokenizer, prompt, max_new_tokens=20, do_sample=False)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gpu_logits = model(ids.to(DEV)).logits.float().cpu()
            cpu_logits = cpu(ids).logits.float()
        diff = (gpu_logits - cpu_logits).abs().max().item()
        assert a == b, (a, b)
        assert diff < 1e-2, diff
        return {"generation": a, "max_logit_diff_gpu_vs_cpu": diff}

    check("load_lora_model_cuda", reload_and_generate)

    def named_adapters_on_cuda():
        import minilora
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(lora_model).to(DEV).eval()
        minilora.load_adapter(model, lora_out, adapter_name="a")
        minilora.load_adapter(model, os.path.join(work, "lora32"), adapter_name="b")
        ids = torch.randint(0, model.config.vocab_size, (2, 32), device=DEV)
        outs = {}
        with torch.no_grad():
            for name in ("a", "b"):
                minilora.set_adapter(model, name)
                outs[name] = model(ids).logits
            with minilora.mixed_batch(model, ["a", "b"]):
                mixed = model(ids).logits
        started = time.perf_counter()
        for _ in range(100):
            minilora.set_adapter(model, "a")
            minilora.set_adapter(model, "b")
        switch_us = (time.perf_counter() - started) / 200 * 1e6
        torch.testing.assert_close(mixed[0], outs["a"][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mixed[1], outs["b"][1], atol=1e-4, rtol=1e-4)
        return {"set_adapter_us": round(switch_us, 1)}

    check("named_adapters_cuda", named_adapters_on_cuda)

    def dropout_exact_on_device():
        # tests/test_bench.py's exactness check, on the device: the one autograd node with its
        # (bool, on GPUs) mask against composed torch ops with the same mask
        import minilora
        from torch import nn

        torch.manual_seed(0)
        layer = minilora.LoRALinear(nn.Linear(256, 384)).to(DEV)
        layer.weight.requires_grad_(False)
        adapter = layer.add_adapter("default", 8, 16.0, dropout=0.25)
        layer.active_adapter = "default"
        with torch.no_grad():
            adapter.lora_B.normal_()
        x = torch.randn(4, 64, 256, device=DEV, requires_grad=True)
        torch.manual_seed(7)
        layer.train()(x).square().sum().backward()
        got = (x.grad.clone(), adapter.lora_A.grad.clone(), adapter.lora_B.grad.clone())
        torch.manual_seed(7)
        keep = minilora.dropout.dropout_mask(x, 0.25)
        x.grad = adapter.lora_A.grad = adapter.lora_B.grad = None
        a, b = adapter.lora_A, adapter.lora_B
        y = nn.functional.linear(x, layer.weight, layer.bias) + (x * keep / 0.75) @ a.T @ b.T * adapter.scaling
        y.square().sum().backward()
        for ours, reference in zip(got, (x.grad, a.grad, b.grad)):
            # float32 sums of thousands of terms in other orders: within 1e-5 of the largest entry
            assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max(), (ours - reference).abs().max()
        return {"mask_dtype": str(keep.dtype), "kept": round(keep.float().mean().item(), 4)}

    check("dropout_exact_on_device", dropout_exact_on_device)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name() if DEV == "cuda" else None, "torch": torch.__version__, "results": results}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu-check-out"))
