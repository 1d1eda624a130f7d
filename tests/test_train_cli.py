"""The command line (train/cli.py, train/config.py) and what a run reports (train/report.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, train_argv
from minilora_train.config import UsageError, build_parser, parse_args

PUBLISHED_FLAGS = ["--dataset_dir", "--dataset_format", "--tokenizer_name_or_path", "--model_name", "--output_dir",
               "--use_lora", "--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target_modules", "--lora_bias",
               "--learning_rate", "--num_train_epochs", "--max_steps", "--per_device_train_batch_size",
               "--gradient_accumulation_steps", "--max_seq_length", "--warmup_steps", "--num_warmup_steps",
               "--weight_decay", "--max_grad_norm", "--logging_steps", "--eval_steps", "--save_epoch_percentage",
               "--streaming_data", "--shuffle_buffer_size", "--num_workers", "--seed", "--gradient_checkpointing",
               "--bf16", "--device", "--resume_from_checkpoint", "--wandb_key", "--report_to",
               "--huggingface_token", "--tmp_dir"]


def cli(*argv, env=None, timeout=300):
    """Run ``python -m minilora_train``; env values of None remove that variable."""
    full = {**os.environ, **(env or {})}
    full = {k: v for k, v in full.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "minilora_train", *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                          env=full, timeout=timeout)


def test_help_lists_every_flag_with_its_default():
    text = build_parser().format_help()
    for flag in PUBLISHED_FLAGS:
        assert flag in text, flag
    assert "(default: 0.0005)" in text  # --learning_rate 5e-4


def test_the_library_alone_installs_torch_and_safetensors_and_the_train_extra_the_rest():
    import re
    import tomllib

    from minilora_train.command import APP_PACKAGES

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]

    def names(requirements):
        return [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements]

    assert names(project["dependencies"]) == ["torch", "safetensors"]
    assert sorted(names(project["optional-dependencies"]["train"])) == sorted(APP_PACKAGES)


def test_without_the_train_extra_each_command_says_in_one_line_what_to_install(monkeypatch, tmp_path, capsys):
    import importlib.metadata

    from minilora_train import evaluate, inference
    from minilora_train.cli import main

    installed = importlib.metadata.version

    def version(name):  # as after `pip install minilora`: wandb and datasets absent
        if name in ("wandb", "datasets"):
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.chdir(tmp_path)
    assert main(["--model_name", "m", "--dataset_dir", "d", "--use_lora"]) == 2
    err = capsys.readouterr().err
    assert err == ("minilora-train: error: the training app needs packages that the library alone does not install "
                   "(missing: datasets, wandb): pip install 'minilora[train]'\n")
    assert os.listdir(tmp_path) == []  # refused before anything was written
    for command, argv in ((inference.main, ["--base_model", "m", "--prompt", "p"]),
                          (evaluate.main, ["--base_model", "m"])):
        with pytest.raises(SystemExit) as stop:
            command(argv)
        assert stop.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_the_published_command_line_parses_unchanged():
    args = parse_args(["--dataset_dir", "gs://your-bucket/medical-dataset", "--tokenizer_name_or_path",
                       "meta-llama/Llama-3.2-1B", "--model_name", "meta-llama/Llama-3.2-1B", "--output_dir",
                       "gs://your-bucket/lora-medical-adapter", "--use_lora", "--lora_r", "16", "--lora_alpha", "32",
                       "--learning_rate", "5e-4", "--num_train_epochs", "3", "--per_device_train_batch_size", "8",
                       "--max_seq_length", "2048", "--wandb_key", "k", "--huggingface_token", "t", "--streaming_data",
                       "--num_warmup_steps", "500", "--lora_target_modules", "q_proj", "v_proj"])
    assert args.use_lora and args.lora_alpha == 32 and args.warmup_steps == 500
    assert args.lora_target_modules == ["q_proj", "v_proj"]
    assert parse_args(["--model_name", "m", "--dataset_dir", "d", "--lora_target_modules", "all-linear"]).lora_target_modules == "all-linear"


def test_config_file_sets_values_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.001\nlora_r: 8\nnum_warmup_steps: 7\n")
    args = parse_args(["--config", str(path), "--model_name", "m", "--dataset_dir", "d", "--lora_r", "32"])
    assert args.learning_rate == 0.001 and args.lora_r == 32 and args.warmup_steps == 7
    path.write_text("learning_rat: 0.001\n")
    with pytest.raises(UsageError, match="unknown settings learning_rat"):
        parse_args(["--config", str(path), "--model_name", "m", "--dataset_dir", "d"])


def test_config_file_values_are_typed_as_flags_are(tmp_path):
    """issue 18: {"use_lora": "false"} kept the string, which is truthy; YAML reads 5e-4 as text."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"use_lora": "false", "bf16": "False", "learning_rate": "5e-4", "lora_r": 8.0,
                                "lora_target_modules": "q_proj", "max_eval_samples": None}))
    args = parse_args(["--config", str(path), "--model_name", "m", "--dataset_dir", "d"])
    assert args.use_lora is False and args.bf16 is False
    assert args.learning_rate == 5e-4 and type(args.lora_r) is int and args.lora_r == 8
    assert args.lora_target_modules == ["q_proj"]  # one name, as the flag takes it, not a regex
    path = tmp_path / "run.yaml"
    path.write_text("lora_target_modules: all-linear\nlearning_rate: 5e-4\n")  # YAML 1.1 reads 5e-4 as text
    args = parse_args(["--config", str(path), "--model_name", "m", "--dataset_dir", "d"])
    assert args.lora_target_modules == "all-linear" and args.learning_rate == 5e-4


@pytest.mark.parametrize("values, message", [
    ({"use_lora": "yes please"}, "use_lora='yes please': give true or false"),
    ({"use_lora": 1}, "use_lora=1: give true or false"),
    ({"device": "gpu"}, "device='gpu': choose one of auto, xla, cuda, cpu"),
    ({"lora_bias": "some"}, "lora_bias='some': choose one of none, all, lora_only"),
    ({"learning_rate": [1e-4]}, "learning_rate=[0.0001]: give one number"),
    ({"lora_r": 2.5}, "lora_r=2.5: give a whole number"),
    ({"lora_r": "eight"}, "lora_r='eight': give a whole number"),
    ({"per_device_train_batch_size": None}, "per_device_train_batch_size=None: this setting needs a value"),
    ({"lora_target_modules": [1, 2]}, "give a list of names"),
    ({"model_name": 5}, "model_name=5: give text"),
    ({"lora_alpha": "inf"}, "--lora_alpha must be a finite number"),
])
def test_config_file_values_of_the_wrong_type_are_refused_naming_the_setting(tmp_path, values, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_args(["--config", str(path), "--model_name", "m", "--dataset_dir", "d", "--use_lora"])


def test_an_os_error_is_one_line_and_exit_2(capsys):
    """A full disk while writing (say) the `latest` marker: one line naming what and where, exit 2."""
    from minilora_train.command import run_command

    def body():
        raise OSError(28, "No space left on device", "/runs/a/latest.tmp")

    assert run_command("minilora-train", [], body) == 2
    assert capsys.readouterr().err == "minilora-train: error: No space left on device: /runs/a/latest.tmp\n"


def test_a_failed_write_leaves_no_temporary_file_and_the_previous_marker(tmp_path, monkeypatch):
    from minilora_train.outputs import RunDir

    out = RunDir(str(tmp_path / "run"))
    first = out.begin_checkpoint(1)
    out.commit_checkpoint(first, 1, keep=0)
    real_replace = os.replace

    def disk_full(source, target):
        if target.endswith("latest"):
            raise OSError(28, "No space left on device", source)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        out.commit_checkpoint(out.begin_checkpoint(2), 2, keep=0)
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoint-1"
    assert not (tmp_path / "run" / "latest.tmp").exists()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()  # complete; resumable by its path


@pytest.mark.parametrize("flags,message", [
    (["--max_seq_length", "0"], "--max_seq_length must be positive"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be positive"),
    (["--gradient_accumulation_steps=-1"], "--gradient_accumulation_steps must be positive"),
    (["--learning_rate=-1e-4"], "--learning_rate must not be negative"),
    (["--lora_r", "0"], "--lora_r must be a positive integer"),
    (["--lora_alpha", "0"], "--lora_alpha must be positive"),
    (["--lora_dropout", "1"], "--lora_dropout must be in"),
])
def test_bad_settings_are_refused_before_loading_anything(flags, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["--model_name", "m", "--dataset_dir", "d", "--use_lora", *flags])


@pytest.mark.parametrize("value", ["yes", "true", "2"])
def test_a_malloc_trim_setting_other_than_0_or_1_is_refused(value, monkeypatch):
    monkeypatch.setenv("MINILORA_MALLOC_TRIM", value)
    with pytest.raises(UsageError, match=f"MINILORA_MALLOC_TRIM must be 1 .* or 0 .*, got '{value}'"):
        parse_args(["--model_name", "m", "--dataset_dir", "d", "--use_lora"])
    monkeypatch.setenv("MINILORA_MALLOC_TRIM", "1")
    parse_args(["--model_name", "m", "--dataset_dir", "d", "--use_lora"])


def test_cli_error_is_one_line_and_exit_2(tmp_path, tiny_model_dir):
    proc = cli(*train_argv(tiny_model_dir, tmp_path / "absent.jsonl", tmp_path / "out"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("minilora-train")]
    assert lines == [f"minilora-train: error: --dataset_dir {tmp_path / 'absent.jsonl'}: no such file or directory"]
    assert "Traceback" not in proc.stderr
    debug = cli(*train_argv(tiny_model_dir, tmp_path / "absent.jsonl", tmp_path / "out"), "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_a_finished_run_is_not_overwritten(tmp_path, tiny_model_dir, tiny_text_file):
    from minilora_train.loop import run

    out = tmp_path / "out"
    run(parse_args(train_argv(tiny_model_dir, tiny_text_file, out, "--max_steps", "1")))
    with pytest.raises(UsageError, match="already holds a finished run"):
        run(parse_args(train_argv(tiny_model_dir, tiny_text_file, out, "--max_steps", "1")))
    run(parse_args(train_argv(tiny_model_dir, tiny_text_file, out, "--max_steps", "1", "--overwrite_output_dir")))


def test_wandb_offline_by_default_and_secrets_appear_nowhere(tmp_path, tiny_model_dir, tiny_text_file):
    key, token = "SENTINELwandbKEY0123456789abcdef01234567", "hf_SENTINELtokenABCDEFGHIJ"
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, tiny_text_file, out, "--max_steps", "3", "--save_epoch_percentage", "0.05")
    argv[argv.index("--report_to") + 1] = "wandb"
    # No key, no WANDB_MODE: offline, with the run under the output directory.
    plain = cli(*argv, env={"WANDB_MODE": None, "WANDB_API_KEY": None})
    assert plain.returncode == 0, plain.stderr[-3000:]
    runs = [p for p in (out / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(runs) == 1

    # With sentinel secrets (WANDB_MODE=offline keeps the test off the network).
    out2 = tmp_path / "out2"
    argv2 = [str(out2) if a == str(out) else a for a in argv]
    proc = cli(*argv2, "--wandb_key", key, "--huggingface_token", token, env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out2 / "train_config.json").read_text())
    assert config["wandb_key"] == "<redacted>" and config["huggingface_token"] == "<redacted>"
    for secret in (key, token):
        assert secret not in proc.stdout and secret not in proc.stderr
        for folder, _, files in os.walk(out2):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    assert secret.encode() not in f.read(), os.path.join(folder, name)
