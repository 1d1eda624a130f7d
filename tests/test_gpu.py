"""The CUDA checks the CPU suite cannot make, marked ``gpu``; without a CUDA GPU they skip.

    pytest -m gpu tests/test_gpu.py                                            # on a machine with an NVIDIA GPU
    MINILORA_GPU_CHECK_JSON=out/gpu-check.json pytest -m gpu tests/test_gpu.py  # and write each check's figures
    MINILORA_GPU_CHECK_DEVICE=cpu MINILORA_GPU_CHECK_STEPS=4 pytest tests/test_gpu.py   # a dry run on the CPU

Trains through the real CLI on the GPU (LoRA in bf16 and in fp32, full fine-tuning of a model with
tied embeddings), reloads the adapter with ``load_lora_model`` there and generates, serves two named
adapters and a mixed batch, and holds dropout's fused node to composed ops with the GPU's bool mask:
what the CPU suite checks on the CPU. docs/benchmarks.md ("On a GPU") has the last run's JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import pytest
import torch

from conftest import dropout_lora_layer, make_tokenizer, medical_sentences, tiny_llama, write_jsonl

DEV = os.environ.get("MINILORA_GPU_CHECK_DEVICE", "cuda")
STEPS = os.environ.get("MINILORA_GPU_CHECK_STEPS", "60")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEV.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA GPU")]


@pytest.fixture(scope="module")
def results():
    """Every check's outcome and figures; written to $MINILORA_GPU_CHECK_JSON after the module."""
    found: list[dict] = []
    yield found
    path = os.environ.get("MINILORA_GPU_CHECK_JSON")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name() if DEV.startswith("cuda") else None,
                       "torch": torch.__version__, "results": found}, f, indent=2)


@contextlib.contextmanager
def check(results: list, name: str):
    """Record the check ``name`` as passed, with the figures put into the yielded dict, or as failed."""
    figures: dict = {}
    try:
        yield figures
    except BaseException as e:
        results.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
        raise
    results.append({"check": name, "ok": True, **figures})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-check")
    models = {}
    for name, tie in (("untied", False), ("tied", True)):
        path = str(root / name)
        tokenizer = make_tokenizer(path, vocab_size=512)
        tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie).save_pretrained(path)
        models[name] = path
    data = write_jsonl(root / "data.jsonl", [{"text": t} for t in medical_sentences(3000)])
    common = ["--dataset_dir", data, "--device", DEV, "--max_seq_length", "128", "--per_device_train_batch_size", "16",
              "--max_steps", STEPS, "--logging_steps", "20", "--eval_steps", "30", "--max_eval_samples", "64",
              "--report_to", "none", "--save_epoch_percentage", "0", "--general_eval_dataset", "none"]
    return {"root": root, "common": common, **models}


def train(argv: list[str]) -> dict:
    """minilora-train in this process; the summary's figures."""
    from minilora_train.cli import main

    started = time.time()
    assert main(argv) == 0
    with open(os.path.join(argv[argv.index("--output_dir") + 1], "train_summary.json")) as f:
        summary = json.load(f)
    return {"seconds": round(time.time() - started, 1), "device": summary["device"],
            "steps_per_second": summary["steps_per_second"], "peak_memory_bytes": summary["peak_memory_bytes"],
            "base_ppl": summary["base"]["validation"]["perplexity"],
            "final_ppl": summary["final"]["validation"]["perplexity"]}


def assert_trained(figures: dict) -> None:
    assert figures["device"].startswith(DEV.split(":")[0]), figures["device"]
    assert figures["final_ppl"] < figures["base_ppl"], figures


@pytest.fixture(scope="module")
def lora_bf16(work, results):
    out = str(work["root"] / "lora")
    with check(results, "lora_bf16_cli") as figures:
        figures.update(train(["--model_name", work["untied"], "--output_dir", out, "--use_lora", "--lora_r", "16",
                              "--lora_alpha", "32", "--lora_dropout", "0.1", "--learning_rate", "2e-3", "--bf16",
                              *work["common"]]))
    return out, figures


@pytest.fixture(scope="module")
def lora_fp32(work, results):
    out = str(work["root"] / "lora32")
    with check(results, "lora_fp32_cli") as figures:
        figures.update(train(["--model_name", work["untied"], "--output_dir", out, "--use_lora", "--lora_r", "16",
                              "--learning_rate", "2e-3", *work["common"]]))
    return out, figures


def test_lora_trains_through_the_cli_in_bf16_and_fp32(lora_bf16, lora_fp32):
    assert_trained(lora_bf16[1])
    assert_trained(lora_fp32[1])


def test_full_fine_tuning_of_a_tied_model_saves_one_embedding_matrix(work, results):
    from safetensors.torch import load_file

    out = str(work["root"] / "full")
    with check(results, "full_tied_cli") as figures:
        figures.update(train(["--model_name", work["tied"], "--output_dir", out, "--learning_rate", "1e-3",
                              *work["common"]]))
        assert_trained(figures)
        saved = load_file(os.path.join(out, "model.safetensors"))
        head = saved.get("lm_head.weight", saved["model.embed_tokens.weight"])
        assert torch.equal(head, saved["model.embed_tokens.weight"]), "tied embedding saved as two matrices"


def test_load_lora_model_on_the_gpu_generates_as_merged_and_matches_the_cpu(work, lora_bf16, results):
    from minilora_train.inference import generate_text, load_lora_model

    adapter = lora_bf16[0]
    with check(results, "load_lora_model_cuda") as figures:
        model, tokenizer = load_lora_model(work["untied"], adapter, device=DEV)
        merged, _ = load_lora_model(work["untied"], adapter, device=DEV, merge=True)
        cpu, _ = load_lora_model(work["untied"], adapter, device="cpu")
        prompt = "patient with fever and"
        unmerged_text = generate_text(model, tokenizer, prompt, max_new_tokens=20, do_sample=False)
        merged_text = generate_text(merged, tokenizer, prompt, max_new_tokens=20, do_sample=False)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            device_logits = model(ids.to(DEV)).logits.float().cpu()
            cpu_logits = cpu(ids).logits.float()
        diff = (device_logits - cpu_logits).abs().max().item()
        figures.update(generation=unmerged_text, max_logit_diff_gpu_vs_cpu=diff)
        assert unmerged_text == merged_text
        assert diff < 1e-2


def test_named_adapters_and_a_mixed_batch_on_the_gpu(work, lora_bf16, lora_fp32, results):
    import minilora
    from transformers import AutoModelForCausalLM

    with check(results, "named_adapters_cuda") as figures:
        model = AutoModelForCausalLM.from_pretrained(work["untied"]).to(DEV).eval()
        minilora.load_adapter(model, lora_bf16[0], adapter_name="a")
        minilora.load_adapter(model, lora_fp32[0], adapter_name="b")
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
        figures["set_adapter_us"] = round((time.perf_counter() - started) / 200 * 1e6, 1)
        torch.testing.assert_close(mixed[0], outs["a"][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mixed[1], outs["b"][1], atol=1e-4, rtol=1e-4)


def test_dropout_on_the_gpu_equals_composed_ops_with_the_same_mask(results):
    # tests/test_fused.py's exactness check, on the device: the one autograd node with its mask
    # (bool on GPUs) against composed torch ops with the same mask
    import minilora
    from torch import nn

    with check(results, "dropout_exact_on_device") as figures:
        layer, adapter = dropout_lora_layer(256, 384, 8, 16.0, 0.25, device=DEV)
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
        figures.update(mask_dtype=str(keep.dtype), kept=round(keep.float().mean().item(), 4))
        for ours, reference in zip(got, (x.grad, a.grad, b.grad)):
            # float32 sums of thousands of terms in other orders: within 1e-5 of the largest entry
            assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max(), (ours - reference).abs().max()
