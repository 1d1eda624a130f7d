"""The embedded default (train/demo.py): settings, the precision it takes, and the run
end to end on the real base (SmolLM2-135M-Instruct from its GGUF), small."""

from __future__ import annotations

import json

import torch

from minilora_train import demo
from minilora_train.config import parse_args
from minilora_train.demo import DEMO_LORA, demo_lora_args
from minilora_train.device import cpu_has_native_bf16


def test_demo_keeps_every_setting_the_user_gave_even_one_equal_to_the_default(tmp_path, monkeypatch):
    # 5e-4 is --learning_rate's default; given on the command line it must win over the demo's own
    # learning rate, while settings the user did not give take the demo's values.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = demo_lora_args(parse_args(["--learning_rate", "5e-4", "--lora_r", "8", "--no-bf16"]), "/base")
    assert (args.learning_rate, args.lora_r, args.bf16) == (5e-4, 8, False)
    assert (args.max_steps, args.lora_top_layers, args.chat_template) == (DEMO_LORA["max_steps"], 8, True)
    assert args.model_name == args.tokenizer_name_or_path == "/base" and args.use_lora and args.train_on_responses_only
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"learning_rate": 5e-4}))
    assert demo_lora_args(parse_args(["--config", str(config)]), "/base").learning_rate == 5e-4
    defaults = demo_lora_args(parse_args(["--device", "cpu"]), "/base")
    assert defaults.learning_rate == DEMO_LORA["learning_rate"]
    assert defaults.bf16 == cpu_has_native_bf16()


def test_demo_end_to_end_on_the_real_base_then_peft_and_minilora_generate_use_its_adapter(
        smollm2, tmp_path, monkeypatch, capsys):
    """The real path, kept small: a few updates on the top 2 of SmolLM2's 30 layers, short answers."""
    from transformers import AutoModelForCausalLM

    import minilora
    import peft
    from minilora_train.cli import main as train_main
    from minilora_train.inference import load_lora_model
    from minilora_train.inference import main as generate_main

    cache, folder, _ = smollm2
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache.parent))  # the session's conversion is found there
    monkeypatch.setattr(demo, "ANSWER_TOKENS", 6)
    out = tmp_path / "minilora-demo"
    assert train_main(["--output_dir", str(out), "--report_to", "none", "--device", "cpu", "--max_steps", "3",
                       "--per_device_train_batch_size", "2", "--max_seq_length", "64", "--max_eval_samples", "2",
                       "--lora_top_layers", "2", "--learning_rate", "1e-2", "--chat_drift_prompts", "2"]) == 0
    printed = capsys.readouterr().out
    for text in ("SmolLM2-135M-Instruct, 134,515,008 parameters", "medical (held-out MedQuAD)",
                 "general (held-out fortunes)", "chat drift on 2 everyday prompts", "Q: What causes Celiac Disease?",
                 "base:", "adapted:",
                 f"minilora-generate --adapter {out}", "CC BY 4.0"):
        assert text in printed, text
    assert ("bfloat16 base" if cpu_has_native_bf16() else "float32 base") in printed
    report = (out / "report.md").read_text()
    assert "## Held-out questions: base vs adapted" in report and "What are the symptoms of Gout?" in report
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["updates"] == 3 and set(summary["final"]) == {"validation", "general"}

    # PEFT loads the adapter onto the base folder its config names, as it is, and computes what minilora does.
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder) and config["layers_to_transform"] == [28, 29]
    ids = torch.tensor([[1, 4093, 198, 1070, 2683, 3418, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                                str(out)).eval()(ids).logits
        ours_model, _ = load_lora_model(str(folder), str(out), device="cpu")
        ours = ours_model(ids).logits
        with minilora.disable_adapters(ours_model):
            base = ours_model(ids).logits
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert (ours - base).abs().max().item() > 1e-3  # the adapter trained: the comparison is not base vs base

    # One flag: the base and the chat template come from the adapter folder.
    assert generate_main(["--adapter", str(out), "--max_new_tokens", "4", "What causes gout?"]) == 0
    assert "### Prompt\nWhat causes gout?\n### Generated\n" in capsys.readouterr().out
