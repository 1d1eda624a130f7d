"""The embedded default (train/demo.py): the README's main command, end to end, with a cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def demo(cache, out, *flags):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "train", "--output_dir", str(out), "--report_to", "none",
                           "--device", "cpu", *flags], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("demo")
    stdout = demo(cache, out, "--demo_pretrain_steps", "6", "--max_steps", "4")
    return cache, out, stdout


def test_demo_runs_end_to_end_and_summarises(first_run):
    cache, out, stdout = first_run
    assert "pre-training the base on general English for 6 updates" in stdout
    assert "minilora demo finished in" in stdout
    for line in ("medical (ICD-10-CM)", "general (fortunes)", "trainable params:", "MB on disk", "minilora-generate"):
        assert line in stdout, line
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "metrics.jsonl", "loss.png",
                 "report.md", "report.json", "train_summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["updates"] == 4 and summary["use_lora"]

    # The adapter reloads onto the cached base and reproduces the final medical loss.
    import minilora
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.data import load_windows
    from train.device import Device
    from train.loop import evaluate

    (base_dir,) = [p / "base" for p in (cache / "minilora").iterdir() if p.name.startswith("demo-")]
    model = minilora.load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), str(out))
    tokenizer = AutoTokenizer.from_pretrained(out)
    medical = load_windows(str(base_dir.parent / "medical-data" / "validation.jsonl"), tokenizer, 128)
    from train.data import cap_windows

    loss = evaluate(model, cap_windows(medical, 64), 32, Device("cpu"), tokenizer.pad_token_id)["loss"]
    assert loss == pytest.approx(summary["final"]["validation"]["loss"], abs=1e-4)


def test_second_run_reuses_the_base_and_a_changed_setting_builds_another(first_run, tmp_path):
    cache, _, _ = first_run
    (entry,) = [p for p in (cache / "minilora").iterdir() if p.name.startswith("demo-")]
    marker = entry / "base" / "PRETRAINED.json"
    before = marker.stat().st_mtime_ns
    stdout = demo(cache, tmp_path / "again", "--demo_pretrain_steps", "6", "--max_steps", "2")
    assert "pre-training" not in stdout and "(cached base)" in stdout
    assert marker.stat().st_mtime_ns == before

    stdout = demo(cache, tmp_path / "other", "--demo_pretrain_steps", "7", "--max_steps", "2")
    assert "pre-training the base on general English for 7 updates" in stdout
    entries = [p for p in (cache / "minilora").iterdir() if p.name.startswith("demo-")]
    assert len(entries) == 2


def test_demo_keeps_every_setting_the_user_gave_even_one_equal_to_the_default(tmp_path):
    # 5e-4 is --learning_rate's default; given on the command line it must win over the demo's own
    # learning rate, while settings the user did not give take the demo's values.
    from train.config import TrainArgs, parse_args
    from train.demo import DEMO_LORA, demo_lora_args
    from train.demo_assets import DemoAssets, DemoSettings

    assert TrainArgs().learning_rate == 5e-4 != DEMO_LORA["learning_rate"]
    assets = DemoAssets(tmp_path, DemoSettings())
    for name in ("medical_train", "medical_validation"):
        getattr(assets, name).parent.mkdir(parents=True, exist_ok=True)
        getattr(assets, name).write_text('{"text": "x"}\n')
    args = demo_lora_args(parse_args(["--learning_rate", "5e-4", "--lora_r", "8"]), assets)
    assert (args.learning_rate, args.lora_r) == (5e-4, 8)
    assert args.max_steps == DEMO_LORA["max_steps"] and args.lora_dropout == DEMO_LORA["lora_dropout"]
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"learning_rate": 5e-4}))
    assert demo_lora_args(parse_args(["--config", str(config)]), assets).learning_rate == 5e-4
    assert demo_lora_args(parse_args([]), assets).learning_rate == DEMO_LORA["learning_rate"]
