"""The training loop (train/loop.py): end to end, XLA graph stability, accumulation, resume, schedule."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import minilora
from conftest import run_xla, train_argv, write_jsonl, medical_sentences
from minilora_train.config import parse_args
from minilora_train.loop import lr_at, run


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def test_end_to_end_lora_run_learns_writes_everything_and_reloads(tiny_model_dir, tiny_text_file, tmp_path):
    out = tmp_path / "run"
    summary = run(parse_args(train_argv(tiny_model_dir, tiny_text_file, out, "--num_train_epochs", "2")))
    losses = [m["train_loss"] for m in metrics(out) if "train_loss" in m]
    assert len(losses) == summary["updates"] > 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # the loss falls clearly
    assert summary["final"]["validation"]["loss"] < summary["base"]["validation"]["loss"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "train_config.json", "metrics.jsonl", "loss.png", "train_summary.json"):
        assert (out / name).exists(), name

    # The adapter alone reproduces the final validation loss, through minilora and through PEFT.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minilora_train.data import prepare_data
    from minilora_train.device import Device
    from minilora_train.loop import evaluate

    args = parse_args(train_argv(tiny_model_dir, tiny_text_file, out))
    tokenizer = AutoTokenizer.from_pretrained(out)
    validation = prepare_data(args, tokenizer).validation
    cpu = Device("cpu")
    model = minilora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    reloaded = evaluate(model, validation, 4, cpu, tokenizer.pad_token_id)["loss"]
    assert reloaded == pytest.approx(summary["final"]["validation"]["loss"], abs=1e-5)

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    assert evaluate(peft_model, validation, 4, cpu, tokenizer.pad_token_id)["loss"] == pytest.approx(reloaded, abs=1e-5)


def test_full_fine_tuning_uses_the_same_loop_and_saves_a_model(tiny_model_dir, tiny_text_file, tmp_path):
    out = tmp_path / "full"
    argv = [a for a in train_argv(tiny_model_dir, tiny_text_file, out, "--max_steps", "4") if a != "--use_lora"]
    summary = run(parse_args(argv))
    assert summary["trainable_params"] == summary["total_params"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # an ordinary checkpoint
    assert not (out / "adapter_model.safetensors").exists()


XLA_RUN = """
import json, os, sys
sys.argv = ["minilora-train"]
from conftest import train_argv
from minilora_train.config import parse_args
from minilora_train.loop import run
argv = train_argv({model!r}, {data!r}, {out!r}, "--device", "xla", "--eval_steps", "5",
                  "--save_epoch_percentage", "0.5", "--logging_steps", "3")
summary = run(parse_args(argv))
print(json.dumps(summary["xla"]))
"""


def test_xla_run_compiles_only_during_warmup_and_matches_eager(tiny_model_dir, tmp_path):
    # 23 records -> an epoch whose last batch is partial, plus evaluations and checkpoints mid-epoch.
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in medical_sentences(23 * 3)])
    out = tmp_path / "xla"
    xla = run_xla(XLA_RUN.format(model=tiny_model_dir, data=data, out=str(out)),
                  env={"PYTHONPATH": os.path.join(os.path.dirname(__file__))})
    assert xla["compiles_after_warmup"] == 0, xla
    # Host reads only where the loop takes them: the logged losses and one per evaluation.
    assert set(xla["host_fallbacks_after_warmup"]) <= {"aten::_local_scalar_dense"}, xla
    xla_metrics = metrics(out)
    logged = sum(1 for m in xla_metrics if "train_loss" in m and m["update"] > 2)
    # one read per evaluated set (medical validation, general English) per evaluation
    evals = sum(sum(k.endswith("_loss") for k in m) for m in xla_metrics if "eval_tag" in m and m["update"] > 2)
    assert xla["host_fallbacks_after_warmup"].get("aten::_local_scalar_dense", 0) <= logged + evals



def test_xla_first_step_loss_equals_eager(tiny_model_dir, tiny_text_file, tmp_path):
    code = """
import json, sys
from conftest import train_argv
from minilora_train.config import parse_args
from minilora_train.loop import run
run(parse_args(train_argv({model!r}, {data!r}, {out!r}, "--device", "xla", "--max_steps", "2")))
print(json.dumps({{}}))
"""
    run_xla(code.format(model=tiny_model_dir, data=tiny_text_file, out=str(tmp_path / "x")),
            env={"PYTHONPATH": os.path.dirname(__file__)})
    run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "e", "--max_steps", "2")))
    xla_losses = [m["train_loss"] for m in metrics(tmp_path / "x") if "train_loss" in m]
    eager_losses = [m["train_loss"] for m in metrics(tmp_path / "e") if "train_loss" in m]
    assert xla_losses[0] == pytest.approx(eager_losses[0], abs=1e-4)


def test_gradient_accumulation_4x1_equals_2x2(tiny_model_dir, tiny_text_file, tmp_path):
    one = run_and_adapter(tiny_model_dir, tiny_text_file, tmp_path / "a", "--per_device_train_batch_size", "4",
                          "--gradient_accumulation_steps", "1", "--max_steps", "3")
    two = run_and_adapter(tiny_model_dir, tiny_text_file, tmp_path / "b", "--per_device_train_batch_size", "2",
                          "--gradient_accumulation_steps", "2", "--max_steps", "3")
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-6, rtol=1e-5)


def test_malloc_trim_after_every_update_when_asked_and_where_glibc_is_the_c_library(tiny_model_dir, tiny_text_file,
                                                                                     tmp_path, monkeypatch):
    """MINILORA_MALLOC_TRIM=1: malloc_trim(0) after every optimizer update (not every micro-batch),
    the memory-for-time trade of docs/benchmarks.md; off unless asked for."""
    import platform
    import sys

    from minilora_train import device

    monkeypatch.delenv("MINILORA_MALLOC_TRIM", raising=False)
    assert device._glibc_malloc_trim() is None  # the default: no trim
    monkeypatch.setenv("MINILORA_MALLOC_TRIM", "1")
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert (device._glibc_malloc_trim() is not None) == glibc
    if glibc:
        assert device._glibc_malloc_trim()(0) in (0, 1)  # 1: memory was released, 0: none was

    calls = []
    monkeypatch.setattr(device, "_MALLOC_TRIM", lambda pad: calls.append(pad) or 0)
    run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "run", "--per_device_train_batch_size", "2",
                              "--gradient_accumulation_steps", "2", "--max_steps", "3")))
    assert calls == [0, 0, 0]


def run_and_adapter(model_dir, data, out, *extra) -> dict:
    run(parse_args(train_argv(model_dir, data, out, *extra)))
    return adapter(out)


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    tiny_text_file = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in medical_sentences(100)])
    common = ("--lora_dropout", "0.1", "--save_epoch_percentage", "0.2", "--save_total_limit", "0")
    straight = run_and_adapter(tiny_model_dir, tiny_text_file, tmp_path / "straight", *common)
    total = json.loads((tmp_path / "straight" / "train_summary.json").read_text())["updates"]

    # The same run, cut at a checkpoint in the middle and continued from it.
    out = tmp_path / "resumed"
    run(parse_args(train_argv(tiny_model_dir, tiny_text_file, out, *common)))
    checkpoints = sorted((p for p in out.iterdir() if p.name.startswith("checkpoint-")),
                         key=lambda p: int(p.name.split("-")[1]))
    middle = checkpoints[len(checkpoints) // 2]
    assert 0 < int(middle.name.split("-")[1]) < total
    with open(out / "metrics.jsonl", "a") as f:  # a kill in the middle of writing a record
        f.write('{"update": 99, "train_lo')
    resumed = run_and_adapter(tiny_model_dir, tiny_text_file, out, *common, "--resume_from_checkpoint", str(middle))
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], atol=1e-6, rtol=0)
    # metrics.jsonl: the torn line and the records past the checkpoint are gone, each update once
    logged = [m["update"] for m in metrics(out) if "train_loss" in m]
    assert logged == list(range(1, total + 1))


def test_resume_latest_and_missing_checkpoint(tiny_model_dir, tiny_text_file, tmp_path):
    from minilora_train.config import UsageError

    with pytest.raises(UsageError, match="no checkpoint"):
        run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "none", "--resume_from_checkpoint", "latest")))
    with pytest.raises(UsageError, match="no such checkpoint"):
        run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "x", "--resume_from_checkpoint",
                                  str(tmp_path / "nothing-here"))))


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (4, 5)])
def test_schedule_warms_up_then_decays_linearly(warmup, total):
    lrs = [lr_at(u, 1.0, warmup, total) for u in range(total)]
    for u in range(warmup):
        assert lrs[u] == pytest.approx((u + 1) / warmup)  # the first update already moves
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[warmup] == pytest.approx(1.0)
    decay = lrs[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing after warm-up
    assert lrs[-1] == pytest.approx(1 / (total - warmup)) and lrs[-1] > 0
    assert lr_at(total, 1.0, warmup, total) == 0.0


def test_schedule_counts_optimizer_updates_with_a_partial_last_accumulation(tiny_model_dir, tmp_path):
    # 9 windows of 32 tokens, batch 2, accumulation 2 -> 5 micro-batches -> 3 updates, the last one partial.
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in medical_sentences(30)])
    out = tmp_path / "run"
    summary = run(parse_args(train_argv(tiny_model_dir, data, out, "--per_device_train_batch_size", "2",
                                        "--gradient_accumulation_steps", "2", "--warmup_steps", "1",
                                        "--learning_rate", "1.0")))
    n_windows = summary["train_windows"]
    updates = -(-(-(-n_windows // 2)) // 2)
    assert summary["updates"] == updates
    logged = [m["lr"] for m in metrics(out) if "lr" in m]
    assert logged == pytest.approx([lr_at(u, 1.0, 1, updates) for u in range(updates)])


def test_forgetting_report_compares_lora_with_full_fine_tuning(tiny_model_dir, tiny_text_file, tmp_path):
    from minilora_train.loop import train_and_report

    out = tmp_path / "run"
    summary = train_and_report(parse_args(train_argv(tiny_model_dir, tiny_text_file, out, "--max_steps", "3",
                                                     "--compare_full_finetune")))
    report = json.loads((out / "report.json").read_text())
    lora, full = report["methods"]
    assert (lora["method"], full["method"]) == ("LoRA", "full fine-tuning")
    for row, run_summary in ((lora, summary), (full, summary["full_finetune"])):
        for key in ("medical_perplexity_base", "medical_perplexity", "general_perplexity_base", "general_perplexity"):
            assert row[key] > 1
        assert row["general_perplexity"] == pytest.approx(run_summary["final"]["general"]["perplexity"])
    assert lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert lora["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert lora["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    assert lora["general_perplexity_base"] == pytest.approx(full["general_perplexity_base"])  # same base, same text
    assert (lora["learning_rate"], full["learning_rate"]) == (5e-3, 5e-5)  # each method's own, in the report
    text = (out / "report.md").read_text()
    assert "| general change (forgetting) |" in text and "full fine-tuning" in text
    assert (out / "report.png").exists() and (out / "full_finetune" / "model.safetensors").exists()
    metrics_lines = metrics(out)
    assert any("general_perplexity" in m for m in metrics_lines)


def test_tied_embeddings_stay_one_matrix_when_trained_on_xla(tmp_path, tiny_text_file):
    # Module.to() cannot move a CPU parameter to XLA in place, so a tied input embedding and LM head
    # (as in Llama-3.2-1B) would become two tensors trained apart. Full fine-tuning on XLA must
    # train and save the one matrix, exactly as eager does. XLA runs the chunked loss here (asked
    # for by name; XLA's default is the full logits), so its compiled loop over the chunks also
    # accumulates the shared matrix's gradient as eager's Python loop does.
    from conftest import make_tokenizer, tiny_llama

    model_dir = tmp_path / "tied"
    tokenizer = make_tokenizer(model_dir)
    tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True).save_pretrained(model_dir)
    code = """
import sys
from conftest import train_argv
from minilora_train.config import parse_args
from minilora_train.loop import run
argv = [a for a in train_argv({model!r}, {data!r}, {out!r}, "--device", "xla", "--max_steps", "3", "--chunked_loss")
        if a != "--use_lora"]
run(parse_args(argv))
print("{{}}")
"""
    run_xla(code.format(model=str(model_dir), data=tiny_text_file, out=str(tmp_path / "x")),
            env={"PYTHONPATH": os.path.dirname(__file__)})
    argv = [a for a in train_argv(str(model_dir), tiny_text_file, tmp_path / "e", "--max_steps", "3") if a != "--use_lora"]
    run(parse_args(argv))
    xla, eager = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("x", "e"))
    assert "lm_head.weight" not in eager
    head = xla.get("lm_head.weight", xla["model.embed_tokens.weight"])
    assert torch.equal(head, xla["model.embed_tokens.weight"])
    torch.testing.assert_close(xla["model.embed_tokens.weight"], eager["model.embed_tokens.weight"], atol=2e-5, rtol=1e-4)
