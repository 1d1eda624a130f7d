"""Reliability and security of a training run (docs/reliability.md): bad input is one line and
exit status 2 with nothing written; a run killed (SIGKILL) while saving or preempted (SIGTERM)
resumes to the same adapter; non-finite updates stop the run or are skipped; nothing in a
checkpoint is unpickled; secrets appear in no output; messy data packs as expected.

Processes are real where a process must die (SIGTERM, SIGKILL); everything else runs in-process."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import minilora
from conftest import ROOT, medical_sentences, run_xla, tiny_llama, train_argv, write_jsonl, write_small_gguf
from minilora_train.cli import main
from minilora_train.config import UsageError, parse_args
from minilora_train.loop import run

WANDB_KEY = "SENTINELwandbKEY0123456789abcdef01234567"
HF_TOKEN = "hf_SENTINELtokenABCDEFGHIJ"
ADAPTER = "adapter_model.safetensors"


# -- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """40 notes: about 50 windows of 32 tokens, about 12 updates an epoch at 2 x 2."""
    return write_jsonl(tmp_path_factory.mktemp("rel-data") / "notes.jsonl", [{"text": t} for t in medical_sentences(40)])


def argv(model_dir, data_path, out, *extra) -> list[str]:
    """A 6-update run, 2 micro-batches of 2 windows an update, with adapter dropout (so the RNG
    state matters on resume) and no general-English evaluation (not what is tested here)."""
    return train_argv(model_dir, data_path, out, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
                      "2", "--lora_dropout", "0.1", "--max_steps", "6", "--general_eval_dataset", "none", *extra)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter of the uninterrupted run that interrupted runs must end at."""
    out = tmp_path_factory.mktemp("rel-reference") / "run"
    run(parse_args(argv(tiny_model_dir, data, out)))
    return load_file(out / ADAPTER)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, data, tmp_path_factory) -> str:
    """A finished run with a checkpoint after every update (tests copy it before damaging it)."""
    out = tmp_path_factory.mktemp("rel-finished") / "run"
    run(parse_args(argv(tiny_model_dir, data, out, "--save_epoch_percentage", "0.01", "--save_total_limit", "0")))
    return str(out)


def snapshot(root) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` ({} when it does not exist)."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def cli_error(args, capsys) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one error line and no traceback."""
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert status == 2, captured.err[-3000:]
    lines = [line for line in captured.err.splitlines() if line.startswith("minilora-train")]
    assert len(lines) == 1 and lines[0].startswith("minilora-train: error: "), captured.err[-3000:]
    assert "Traceback" not in captured.err
    return lines[0]


def assert_same_adapter(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)  # eager CPU: the bound


def child(script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -c script args…`` from the repository root: a real training process."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


def assert_no_secret(root, *texts: str) -> None:
    """Neither secret in any text given nor in any byte of any file under ``root``."""
    for secret in (WANDB_KEY, HF_TOKEN):
        for text in texts:
            assert secret not in text
        for folder, _, files in os.walk(root):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    assert secret.encode() not in f.read(), os.path.join(folder, name)


class Trap:
    """Unpickling this creates ``marker``: a stand-in for code an attacker runs on load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# -- bad input: one line, exit 2, nothing written -------------------------------------------------

def _write(tmp_path, name, content: bytes) -> str:
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


# (id, data: tmp_path -> path or None for the shared notes, extra flags, words the error must hold)
BAD_INPUT = [
    ("dataset-missing", lambda t: str(t / "absent.jsonl"), [], "absent.jsonl: no such file or directory"),
    ("empty-after-filtering", lambda t: write_jsonl(t / "blank.jsonl", [{"text": "  "}, {"text": ""}, {"text": None}] * 4),
     [], "no training text left after dropping empty records"),
    ("malformed-json-line", lambda t: _write(t, "bad.jsonl", b'{"text": "fine"}\n\n{"text": broken}\n'), [],
     "bad.jsonl:3: malformed JSON line"),
    ("no-text-fields", lambda t: write_jsonl(t / "x.jsonl", [{"title": "a", "body": "b"}] * 4), [],
     "found columns: title, body"),
    ("not-utf8", lambda t: _write(t, "latin.txt", "fi\xe8vre\n\ncaf\xe9\n".encode("latin-1")), [],
     "latin.txt:1: not valid UTF-8"),
    ("seq-length-zero", None, ["--max_seq_length", "0"], "--max_seq_length must be positive, got 0"),
    ("seq-length-above-model", None, ["--max_seq_length", "1024"], "--max_seq_length 1024 exceeds the model's maximum of 256"),
    ("batch-zero", None, ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be positive"),
    ("accumulation-zero", None, ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be positive"),
    ("negative-lr", None, ["--learning_rate=-1e-4"], "--learning_rate must not be negative"),
    ("rank-zero", None, ["--lora_r", "0"], "--lora_r must be a positive integer"),
    ("alpha-zero", None, ["--lora_alpha", "0"], "--lora_alpha must be positive"),
    ("dropout-one", None, ["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    ("targets-match-nothing", None, ["--lora_target_modules", "qproj", "vproj"],
     "no module matched target_modules=['qproj', 'vproj']; Linear module names here end in: q_proj, k_proj"),
    ("model-path-missing", None, ["--model_name", "{tmp}/no-such-model"], "no-such-model: no such directory"),
    ("resume-from-nothing", None, ["--resume_from_checkpoint", "{tmp}/nothing-here"], "no such checkpoint"),
    ("resume-latest-of-nothing", None, ["--resume_from_checkpoint", "latest"], "latest: no checkpoint in"),
    # issue 18: data that used to be dropped silently or end in a traceback
    ("half-the-records-lack-text", lambda t: write_jsonl(t / "mixed.jsonl", [{"text": s} for s in medical_sentences(20)]
                                                         + [{"body": s} for s in medical_sentences(20)]), [],
     "mixed.jsonl:21: this record has other fields (found: body) than the record at"),
    ("integer-text", lambda t: write_jsonl(t / "ints.jsonl", [{"text": "fine"}, {"text": 5}] * 3), [],
     "ints.jsonl:2: 'text' holds int 5; it must be text"),
    ("zero-byte-file", lambda t: _write(t, "empty.jsonl", b""), [], "empty.jsonl is empty (0 bytes)"),
    ("deeply-nested-json", lambda t: _write(t, "deep.jsonl", b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}\n"), [],
     "deep.jsonl:1: JSON nested too deeply to read"),
    ("validation-takes-everything", lambda t: write_jsonl(t / "two.jsonl", [{"text": s} for s in medical_sentences(2)]),
     ["--validation_split_percentage", "99"], "--validation_split_percentage 99 of 2 records holds out 2, leaving none"),
    ("only-test-files", lambda t: os.path.dirname(write_jsonl((t / "d").mkdir() or t / "d" / "test.jsonl",
                                                              [{"text": "a"}])), [],
     "no training files; found only test.jsonl"),
    # settings that used to report what was not measured, or blamed the wrong flag
    ("max-eval-samples-zero", None, ["--max_eval_samples", "0"], "--max_eval_samples must be positive"),
    ("epochs-inf", None, ["--num_train_epochs", "inf", "--max_steps", "-1"], "--num_train_epochs must be a finite number"),
    ("alpha-inf", None, ["--lora_alpha", "inf"], "--lora_alpha must be a finite number, got inf"),
    ("seq-length-one", None, ["--max_seq_length", "1"], "--max_seq_length must be at least 2"),
    ("output-dir-empty", None, ["--output_dir", ""], "--output_dir is empty"),
    ("config-bool-as-other-text", lambda t: _config(t, {"use_lora": "no way"}), ["--config", "{tmp}/c.json"],
     "use_lora='no way': give true or false"),
    ("config-device-not-a-choice", lambda t: _config(t, {"device": "gpu"}), ["--config", "{tmp}/c.json"],
     "device='gpu': choose one of auto, xla, cuda, cpu"),
    ("config-list-for-a-number", lambda t: _config(t, {"learning_rate": [1e-4]}), ["--config", "{tmp}/c.json"],
     "learning_rate=[0.0001]: give one number"),
    # base models that cannot be read
    ("base-truncated", lambda t: _base_copy(t, lambda d: open(os.path.join(d, "model.safetensors"), "r+b").truncate(1000)),
     ["--model_name", "{tmp}/base"], "base: its weights could not be read (SafetensorError"),
    ("base-pickled", lambda t: _base_copy(t, _pickled_weights), ["--model_name", "{tmp}/base"],
     "base: its weights could not be read (UnpicklingError"),
    # issue 30's scan: a TypeError traceback; errors blamed on the weights; an empty output directory left behind
    ("base-config-not-a-mapping", lambda t: _base_copy(t, lambda d: open(os.path.join(d, "config.json"), "w").write("[1]")),
     ["--model_name", "{tmp}/base"], "base: its config.json could not be read"),
    ("base-tokenizer-damaged", lambda t: _base_copy(t, lambda d: open(os.path.join(d, "tokenizer.json"), "w").write("{")),
     ["--model_name", "{tmp}/base"], "base: its tokenizer files could not be read (JSONDecodeError"),
    ("saved-dataset-damaged", lambda t: os.path.dirname(_write((t / "saved").mkdir() or t / "saved", "state.json", b"{")), [],
     "saved: a folder saved by datasets' save_to_disk that cannot be read"),
    # issue 30: a struct.error traceback and exit 1
    ("gguf-cut-in-its-header", lambda t: _cut(write_small_gguf(t / "base.gguf"), 100), ["--model_name", "{tmp}/base.gguf"],
     "base.gguf: the file ends at byte 100, inside its GGUF header"),
    # issue 30: it stopped at update 1 blaming the learning rate for a loss over no tokens
    ("prompts-fill-the-window", lambda t: write_jsonl(t / "qa.jsonl", _questions(20, sentences=3)),
     ["--train_on_responses_only"], "--train_on_responses_only: the prompt (question and context) of every one of the "
                                    "19 training examples takes"),
]


def _cut(path, size) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _questions(n, sentences):
    """Question/response records whose questions are ``sentences`` clinical sentences long; with the
    template, the tiny tokenizer makes a prompt of about 50 tokens of 0 sentences, 170 of 3."""
    notes = medical_sentences(sentences)
    return [{"question": " ".join(notes) + f" What now for case {i}?", "response": f"Rest and fluids, case {i}."}
            for i in range(n)]


def _config(tmp, values) -> None:
    (tmp / "c.json").write_text(json.dumps(values))


def _base_copy(tmp, damage) -> None:
    """A copy of the tiny model (the test sets MINILORA_TEST_MODEL_DIR) as tmp/base, damaged by ``damage(folder)``."""
    shutil.copytree(os.environ["MINILORA_TEST_MODEL_DIR"], tmp / "base")
    damage(str(tmp / "base"))


def _pickled_weights(folder) -> None:
    """The weights as a pickle whose loading would run code (here: create a marker file)."""
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save({"model.embed_tokens.weight": Trap(os.path.join(folder, "..", "code-ran"))},
               os.path.join(folder, "pytorch_model.bin"))


@pytest.mark.parametrize("make_data, extra, words", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(make_data, extra, words, tmp_path, tiny_model_dir, data,
                                                         capsys, monkeypatch):
    monkeypatch.setenv("MINILORA_TEST_MODEL_DIR", tiny_model_dir)
    path = (make_data(tmp_path) if make_data else None) or data
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    line = cli_error(argv(tiny_model_dir, path, out, *extra), capsys)
    assert words in line
    assert not out.exists() and snapshot(tmp_path) == before  # not even an empty output directory
    assert not (tmp_path / "code-ran").exists()  # nothing was unpickled


def test_an_unwritable_output_directory_is_one_line(tmp_path, tiny_model_dir, data, capsys):
    (tmp_path / "a-file").write_text("not a folder")  # as root, permissions do not stop writes; this does
    line = cli_error(argv(tiny_model_dir, data, tmp_path / "a-file" / "out"), capsys)
    assert "a-file/out is not writable (Not a directory); pick another directory" in line
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_a_model_that_does_not_exist_offline_is_one_line_in_a_real_process(tmp_path, tiny_model_dir, data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # read when huggingface_hub is imported: a fresh process
    proc = subprocess.run([sys.executable, "-m", "minilora_train", *argv("no-such-org/no-such-model", data, tmp_path / "out",
                                                                "--tokenizer_name_or_path", tiny_model_dir,
                                                                "--huggingface_token", HF_TOKEN)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("minilora-train")]
    assert len(lines) == 1 and "--model_name no-such-org/no-such-model: could not load it" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    assert_no_secret(tmp_path, proc.stdout, proc.stderr)


def test_secrets_stay_out_of_errors_even_with_debug(tmp_path, tiny_model_dir, data, capsys):
    for flags in ([], ["--debug"]):
        status = main(argv(tiny_model_dir, tmp_path / "absent.jsonl", tmp_path / "out", "--wandb_key", WANDB_KEY,
                           "--huggingface_token", HF_TOKEN, *flags))
        captured = capsys.readouterr()
        assert status == 2 and ("Traceback" in captured.err) == bool(flags)
        assert_no_secret(tmp_path, captured.out, captured.err)


# -- untrusted or damaged checkpoints: refused in one line, nothing unpickled, nothing changed ----

def _rewrite_json(ckpt, name, **changes):
    path = os.path.join(ckpt, name)
    with open(path) as f:
        values = json.load(f)
    values.update(changes)
    with open(path, "w") as f:
        json.dump(values, f)


def _rewrite_config(ckpt, **changes):
    _rewrite_json(ckpt, "adapter_config.json", **changes)


def _adapter_of_another_base(ckpt):
    other = minilora.inject(tiny_llama(hidden_size=32, intermediate_size=64), r=4, alpha=8)
    minilora.save_adapter(other, ckpt, base_model_name_or_path="some/other-base")


def _plant(name):
    def plant(ckpt, marker):
        if name == "adapter_model.bin":  # a PEFT pickle adapter in place of the safetensors one
            os.remove(os.path.join(ckpt, ADAPTER))
            with open(os.path.join(ckpt, name), "wb") as f:
                pickle.dump({"weights": Trap(marker)}, f)
        else:  # a valid torch zip whose pickle calls open() when loaded without weights_only
            torch.save({"state": Trap(marker)}, os.path.join(ckpt, name))
    return plant


# (id, damage: (checkpoint folder, marker path) -> None, words the error must hold)
DAMAGE = [
    ("adapter-file-missing", lambda c, m: os.remove(os.path.join(c, ADAPTER)), f"has no {ADAPTER}"),
    ("adapter-truncated", lambda c, m: open(os.path.join(c, ADAPTER), "r+b").truncate(100), "is truncated or corrupted"),
    ("adapter-corrupted", lambda c, m: open(os.path.join(c, ADAPTER), "r+b").write(b"\xff" * 16), "is truncated or corrupted"),
    ("config-wrong-type", lambda c, m: _rewrite_config(c, r="4"), "r='4' should be int"),
    ("config-out-of-range", lambda c, m: _rewrite_config(c, lora_dropout=1.5), "dropout"),
    ("config-not-json", lambda c, m: open(os.path.join(c, "adapter_config.json"), "w").write("{r: 4"), "is not valid JSON"),
    ("adapter-of-another-base", lambda c, m: _adapter_of_another_base(c),
     "(it was trained on some/other-base): shape mismatch base_model.model.model.layers.0.mlp.down_proj.lora_A.weight: "
     "file (4, 64) vs model (4, 128)"),
    ("pickle-adapter", _plant("adapter_model.bin"), "holds only adapter_model.bin, a pickle file; loading pickle can "
                                                    "execute arbitrary code"),
    ("malicious-optimizer-pt", _plant("optimizer.pt"), "optimizer.pt was not loaded: it is damaged or holds more than tensors"),
    ("malicious-rng-pt", _plant("rng.pt"), "rng.pt was not loaded: it is damaged or holds more than tensors"),
    ("optimizer-pt-truncated", lambda c, m: open(os.path.join(c, "optimizer.pt"), "r+b").truncate(64), "optimizer.pt was not loaded"),
    ("trainer-state-damaged", lambda c, m: open(os.path.join(c, "trainer_state.json"), "w").write('{"update": '),
     "trainer_state.json is damaged"),
    ("trainer-state-wrong-shape", lambda c, m: _rewrite_state(c, history=5), "trainer_state.json is damaged"),
    ("trainer-state-negative", lambda c, m: _rewrite_state(c, micro=-3), "trainer_state.json is damaged"),
    ("adapter-nan", lambda c, m: _nan_adapter(c), "non-finite value(s) (NaN or inf)"),
]


def _rewrite_state(ckpt, **changes):
    _rewrite_json(ckpt, "trainer_state.json", **changes)


def _nan_adapter(ckpt):
    """What a diverged run would have saved, had the run not refused to (issue 18: it was resumed as good)."""
    from safetensors.torch import save_file

    state = load_file(os.path.join(ckpt, ADAPTER))
    next(v for k, v in state.items() if "lora_B" in k)[0, 0] = float("nan")
    save_file(state, os.path.join(ckpt, ADAPTER))


@pytest.mark.parametrize("damage, words", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_or_hostile_checkpoint_is_refused_and_runs_no_code(damage, words, finished_run, tiny_model_dir,
                                                                     data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    marker = tmp_path / "code-ran"
    damage(str(out / "checkpoint-3"), marker)
    before = snapshot(out)
    line = cli_error(argv(tiny_model_dir, data, out, "--resume_from_checkpoint", out / "checkpoint-3"), capsys)
    assert words in line
    assert not marker.exists()  # nothing was unpickled
    assert snapshot(out) == before  # a refused resume changes nothing


@pytest.fixture(scope="module")
def instruct_run(instruct_dir, data, tmp_path_factory) -> str:
    """A finished run on an instruct base, with checkpoints, chat drift and self-replay: its output
    directory holds the base's chat answers and self-distillation answers that a resume reads back."""
    out = tmp_path_factory.mktemp("rel-instruct") / "run"
    run(parse_args(argv(instruct_dir, data, out, "--max_steps", "2", "--save_epoch_percentage", "0.01",
                        "--chat_drift_prompts", "2", "--replay_self", "0.2")))
    return str(out)


# (id, file of the run directory, what is written into it): issue 30's scan, a raw traceback each before
RUN_FILES = [
    ("chat-probe-not-json", "chat_probe.json", '{"prompts": ['),
    ("chat-probe-wrong-shape", "chat_probe.json", json.dumps({"prompts": ["hi"], "prompt_ids": [["a"]],
                                                              "answer_ids": [[1]], "base_nll": 1.0})),
    ("self-answers-wrong-shape", "self_distillation.json", json.dumps([[[1, 2], [3]], [[4]]])),
    ("mc-base-wrong-shape", "medical_mc_base.json", json.dumps({"correct": [1, 0], "n": 2, "accuracy": 0.5})),
]


@pytest.mark.parametrize("name, content", [c[1:] for c in RUN_FILES], ids=[c[0] for c in RUN_FILES])
def test_a_damaged_file_the_resume_reads_from_the_run_is_one_line(name, content, instruct_run, instruct_dir, data,
                                                                  tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(instruct_run, out)
    (out / name).write_text(content)
    before = snapshot(out)
    line = cli_error(argv(instruct_dir, data, out, "--max_steps", "2", "--chat_drift_prompts", "2",
                          "--replay_self", "0.2", "--resume_from_checkpoint", "latest"), capsys)
    assert f"{name} is damaged (" in line and "restore it, or start the run over with --overwrite_output_dir" in line
    assert snapshot(out) == before


def test_the_planted_pickle_would_run_code_if_unpickled(tmp_path):
    """The check above means something: the same file, loaded the unsafe way, runs the code."""
    marker = tmp_path / "code-ran"
    _plant("optimizer.pt")(str(tmp_path), marker)
    torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("finished", [True, False], ids=["finished-run", "interrupted-run"])
def test_an_output_directory_holding_a_run_is_refused_unless_told(finished, finished_run, tiny_model_dir, data,
                                                                   tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    if not finished:
        os.remove(out / "train_summary.json")
    before = snapshot(out)
    line = cli_error(argv(tiny_model_dir, data, out), capsys)
    assert ("already holds a finished run" if finished else "holds the checkpoints of an unfinished run") in line
    assert snapshot(out) == before
    # --overwrite_output_dir starts over: the old run's checkpoints can never be resumed from by mistake.
    run(parse_args(argv(tiny_model_dir, data, out, "--overwrite_output_dir", "--max_steps", "1")))
    assert not any(name.startswith("checkpoint-") for name in os.listdir(out))
    assert not (out / "latest").exists()


# (id, flags of the resumed run, words): settings that change what the checkpoint means (issue 18, issue 30)
CHANGED_ON_RESUME = [
    ("another-base", ["--model_name", "{tmp}/same-shape-copy"], "the checkpoint was made with --model_name"),
    ("alpha", ["--lora_alpha", "64"], "made with --lora_alpha 8.0 and this run has --lora_alpha 64.0"),
    ("rank", ["--lora_r", "8"], "made with --lora_r 4 and this run has --lora_r 8"),
    ("batch-size", ["--per_device_train_batch_size", "4"],
     "made with --per_device_train_batch_size 2 and this run has --per_device_train_batch_size 4"),
    ("window-length", ["--max_seq_length", "16"], "made with --max_seq_length 32 and this run has --max_seq_length 16"),
    ("data", ["--dataset_dir", "{tmp}/other.jsonl"], "the checkpoint was made with --dataset_dir"),
    # the base as loaded: its tokenizer, quantization and dtype
    ("another-tokenizer", ["--tokenizer_name_or_path", "{tmp}/same-shape-copy"],
     "the checkpoint was made with --tokenizer_name_or_path"),
    ("quantized-now", ["--quantize", "int8"], "made with no --quantize and this run has --quantize int8"),
    ("bf16-now", ["--bf16"], "made with --no-bf16 and this run has --bf16"),
    # the adapter's layers; the data's reading and formatting; what the base's evaluation was measured on
    ("top-layers", ["--lora_top_layers", "1"], "made with no --lora_top_layers and this run has --lora_top_layers 1"),
    ("chat-template", ["--chat_template"], "made with --no-chat_template and this run has --chat_template"),
    ("evaluation-cap", ["--max_eval_samples", "3"], "made with no --max_eval_samples and this run has --max_eval_samples 3"),
    ("general-evaluation", ["--general_eval_dataset", "{tmp}/other.jsonl"],
     "made with --general_eval_dataset none and this run has --general_eval_dataset"),
]


@pytest.mark.parametrize("flags, words", [c[1:] for c in CHANGED_ON_RESUME], ids=[c[0] for c in CHANGED_ON_RESUME])
def test_a_resume_that_would_change_what_the_checkpoint_means_is_refused(flags, words, finished_run, tiny_model_dir,
                                                                         data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    shutil.copytree(tiny_model_dir, tmp_path / "same-shape-copy")  # same shapes: the adapter would load silently
    write_jsonl(tmp_path / "other.jsonl", [{"text": t} for t in medical_sentences(40, seed=5)])
    before = snapshot(out)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    line = cli_error(argv(tiny_model_dir, data, out, "--resume_from_checkpoint", "latest", *flags), capsys)
    assert words in line and "Resume with" in line
    assert snapshot(out) == before


# (id, {flag: path under tmp} for the run, words): output directories that would change a folder the run reads
READ_FOLDERS = [
    ("the-base-folder", {"--model_name": "base", "--output_dir": "base/../base/"},
     "is the folder of the base model (--model_name"),
    ("the-tokenizer-folder", {"--tokenizer_name_or_path": "base", "--output_dir": "base"},
     "is the folder of the base model (--tokenizer_name_or_path"),
    ("inside-the-data-folder", {"--dataset_dir": "data", "--output_dir": "data/runs/one"},
     "is inside the data folder (--dataset_dir"),
    ("a-base-named-like-a-checkpoint", {"--model_name": "runs/checkpoint-500", "--output_dir": "runs"},
     "holds --model_name"),
]


@pytest.mark.parametrize("paths, words", [c[1:] for c in READ_FOLDERS], ids=[c[0] for c in READ_FOLDERS])
def test_an_output_directory_the_run_reads_from_is_refused_and_nothing_changes(paths, words, tiny_model_dir, data,
                                                                               tmp_path, capsys):
    """Issue 30: --output_dir equal to the base's folder exited 0, and from_pretrained of the base
    folder then loaded base + adapter without a word."""
    shutil.copytree(tiny_model_dir, tmp_path / "base")
    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "checkpoint-500")
    (tmp_path / "data").mkdir()
    shutil.copy(data, tmp_path / "data" / "notes.jsonl")
    before = snapshot(tmp_path)
    args = argv(tiny_model_dir, tmp_path / "data", tmp_path / "out")
    for flag, path in paths.items():  # the flags given here replace the usual ones (last one wins in argparse)
        args += [flag, str(tmp_path / path)]
    line = cli_error(args, capsys)
    assert words in line and "choose another --output_dir" in line
    assert snapshot(tmp_path) == before


def test_an_output_directory_inside_the_base_folder_leaves_what_the_base_loads_unchanged(tiny_model_dir, data,
                                                                                         tmp_path):
    """The decision beside the test above: from_pretrained reads only a folder's own files, so a run
    written into a subfolder of the base changes nothing the base loads."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    before = snapshot(tmp_path / "base")
    run(parse_args(argv(tmp_path / "base", data, tmp_path / "base" / "runs" / "one", "--max_steps", "1")))
    after = snapshot(tmp_path / "base")
    assert {k: v for k, v in after.items() if not k.startswith("runs" + os.sep)} == before
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "base")(ids).logits,
                           AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits)


def test_a_checkpoint_over_a_quantized_base_resumes_only_over_the_same_quantization(tiny_model_dir, data, tmp_path,
                                                                                     capsys):
    """Issue 30: a checkpoint made with --quantize nf4 resumed under --quantize int8 with exit 0."""
    out = tmp_path / "run"
    run(parse_args(argv(tiny_model_dir, data, out, "--quantize", "nf4", "--max_steps", "2",
                        "--save_epoch_percentage", "0.01")))
    before = snapshot(out)
    for flags, words in ((["--quantize", "int8"], "made with --quantize nf4 and this run has --quantize int8"),
                         ([], "made with --quantize nf4 and this run has no --quantize")):
        line = cli_error(argv(tiny_model_dir, data, out, "--max_steps", "2", "--resume_from_checkpoint", "latest",
                              *flags), capsys)
        assert words in line and "Resume with --quantize nf4" in line
        assert snapshot(out) == before
    assert main(argv(tiny_model_dir, data, out, "--quantize", "nf4", "--max_steps", "2",
                     "--resume_from_checkpoint", "latest")) == 0


def test_the_batch_a_checkpoint_counts_in_is_compared_over_all_devices(tiny_model_dir, data):
    """Its position counts micro-batches of per-device rows x data-parallel devices: 8 x 1 resumes
    as 4 x 2, and 8 x 2 would skip twice the windows (torchrun, SPMD: tests/test_scaling.py runs them)."""
    from minilora_train.outputs import check_resume_settings, resume_settings

    saved = resume_settings(parse_args(argv(tiny_model_dir, data, "out", "--per_device_train_batch_size", "8")), 1)
    check_resume_settings(saved, parse_args(argv(tiny_model_dir, data, "out", "--per_device_train_batch_size", "4")),
                          "ckpt", devices=2)
    with pytest.raises(UsageError, match=r"made with micro-batches of 8 windows over all devices and this run's take "
                                         r"16 \(--per_device_train_batch_size 8 on 2 device\(s\)\).*Resume with "
                                         r"--per_device_train_batch_size 4 on these 2 device\(s\)"):
        check_resume_settings(saved, parse_args(argv(tiny_model_dir, data, "out", "--per_device_train_batch_size", "8")),
                              "ckpt", devices=2)


def test_the_data_format_is_compared_as_the_reader_used(tiny_model_dir, data):
    """No --dataset_format, json and jsonl all read a .jsonl file the same way; text reads it otherwise."""
    from minilora_train.outputs import check_resume_settings, resume_settings

    def settings(*flags):
        return resume_settings(parse_args(argv(tiny_model_dir, data, "out", *flags)))

    assert settings() == settings("--dataset_format", "json") == settings("--dataset_format", "jsonl")
    with pytest.raises(UsageError, match="made with --dataset_format json and this run has --dataset_format text"):
        check_resume_settings(settings(), parse_args(argv(tiny_model_dir, data, "out", "--dataset_format", "text")),
                              "ckpt")


def test_an_output_directory_holding_files_no_run_wrote_is_refused_unless_told(tiny_model_dir, data, tmp_path, capsys):
    """Issue 30's scan: a folder holding another model (not this run's base) took the run's adapter
    and tokenizer files over its own without a word."""
    from minilora_train.outputs import RunDir

    out = tmp_path / "another-model"
    tiny_llama(seed=3).save_pretrained(out)
    before = snapshot(out)
    line = cli_error(argv(tiny_model_dir, data, out), capsys)
    assert "holds files no minilora-train run wrote (config.json, generation_config.json, model.safetensors)" in line
    assert "--overwrite_output_dir" in line and snapshot(out) == before
    run(parse_args(argv(tiny_model_dir, data, out, "--overwrite_output_dir", "--max_steps", "1")))
    assert (out / "adapter_model.safetensors").exists() and (out / "model.safetensors").exists()
    # what counts as a run's folder: one with a file a run writes first; hidden files alone are no one's
    other = tmp_path / "other"
    other.mkdir()
    (other / ".DS_Store").write_text("")
    assert RunDir(str(other)).foreign_entries() == []
    (other / "notes.txt").write_text("mine")
    assert RunDir(str(other)).foreign_entries() == ["notes.txt"]
    (other / "train_config.json").write_text("{}")
    assert RunDir(str(other)).foreign_entries() == []


def test_a_second_run_into_a_busy_output_directory_is_refused(tiny_model_dir, data, tmp_path, capsys):
    """issue 18: two runs into one directory both reported success and one run's results were gone."""
    from minilora_train.outputs import LOCK, RunDir

    out = tmp_path / "run"
    holder = RunDir(str(out))
    holder.lock()  # what a running minilora-train holds (an flock: the kernel drops it when the holder dies)
    try:
        before = snapshot(tmp_path)
        line = cli_error(argv(tiny_model_dir, data, out), capsys)
        assert f"--output_dir {out} is in use by another minilora-train run (pid {os.getpid()} on " in line
        assert snapshot(tmp_path) == before
    finally:
        holder.unlock()
    assert not (out / LOCK).exists()
    # A lock file left by a killed run holds no lock: the next run takes it over and removes it at the end.
    (out / LOCK).write_text("pid 999999 on a-dead-host")
    assert main([str(a) for a in argv(tiny_model_dir, data, out, "--max_steps", "1")]) == 0
    assert not (out / LOCK).exists() and (out / "train_summary.json").exists()


def test_two_real_processes_cannot_hold_one_output_directory(tmp_path):
    """The lock between processes (the test above holds it from the same process)."""
    from minilora_train.outputs import RunDir

    out = tmp_path / "run"
    holder = RunDir(str(out))
    holder.lock()
    try:
        proc = child("""
            import sys
            from minilora_train.outputs import RunDir
            from minilora_train.config import UsageError
            try:
                RunDir(sys.argv[1]).lock()
            except UsageError as e:
                print(e)
            """, [out], timeout=120)
        assert "is in use by another minilora-train run" in proc.stdout, proc.stderr[-2000:]
    finally:
        holder.unlock()


# -- crashes and preemption -----------------------------------------------------------------------

SIGKILL_WHILE_SAVING = """
import io, os, signal, sys
import torch
import minilora_train.loop as loop

save = loop.save_tensors_safely

def save_or_die(obj, path):
    # The machine goes away half-way through writing checkpoint-3's optimizer state.
    if path.endswith(os.path.join(".checkpoint-3.partial", "optimizer.pt")):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        with open(path + ".tmp", "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    save(obj, path)

loop.save_tensors_safely = save_or_die
from minilora_train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_while_saving_leaves_the_latest_checkpoint_intact_and_resume_is_exact(tiny_model_dir, data, tmp_path,
                                                                                       reference):
    out = tmp_path / "run"
    flags = argv(tiny_model_dir, data, out, "--save_epoch_percentage", "0.01")  # a checkpoint every update
    proc = child(SIGKILL_WHILE_SAVING, flags)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # Killed mid-save: the half-written checkpoint exists only under its temporary name.
    partial = out / ".checkpoint-3.partial"
    assert ADAPTER in os.listdir(partial) and "trainer_state.json" not in os.listdir(partial)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["update"] == 2

    summary = run(parse_args(flags + ["--resume_from_checkpoint", "latest"]))
    assert summary["updates"] == 6 and not partial.exists()
    assert_same_adapter(load_file(out / ADAPTER), reference)


SIGTERM_MID_UPDATE = """
import os, signal, sys
import minilora_train.loop as loop

load = loop.load_model_and_tokenizer

def load_and_arm(args):
    model, tokenizer = load(args)
    forwards = [0]

    def preempt(module, inputs, output):
        if module.training:
            forwards[0] += 1
            if forwards[0] == 5:  # the first of update 3's two micro-batches: the scheduler says stop
                os.kill(os.getpid(), signal.SIGTERM)

    # the decoder, not the whole model: the chunked loss calls the decoder and the LM head itself
    model.get_decoder().register_forward_hook(preempt)
    return model, tokenizer

loop.load_model_and_tokenizer = load_and_arm
from minilora_train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_finishes_the_update_checkpoints_exits_0_and_resume_is_exact(tiny_model_dir, data, tmp_path, reference,
                                                                             capsys):
    out = tmp_path / "run"
    flags = argv(tiny_model_dir, data, out, "--wandb_key", WANDB_KEY, "--huggingface_token", HF_TOKEN)
    proc = child(SIGTERM_MID_UPDATE, flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SIGTERM received" in proc.stderr
    assert f"Resume with: minilora-train ... --output_dir {out} --resume_from_checkpoint latest" in proc.stdout
    # Update 3 was finished (both micro-batches), then checkpointed; the run is not marked finished.
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["update"], state["micro"]) == (3, 6)
    assert not (out / "train_summary.json").exists()

    assert main(flags + ["--resume_from_checkpoint", "latest"]) == 0
    resumed = capsys.readouterr()
    assert json.loads((out / "train_summary.json").read_text())["updates"] == 6
    assert_same_adapter(load_file(out / ADAPTER), reference)
    # Secrets: not in either process's output, checkpoints, config, metrics or report.
    assert (out / "report.md").exists() and (out / "checkpoint-3").exists()
    assert_no_secret(out, proc.stdout, proc.stderr, resumed.out, resumed.err)


def test_remote_latest_names_only_a_verified_upload(tmp_path, monkeypatch):
    """An object store has no rename: a checkpoint is uploaded, checked, and only then named in
    `latest`; a cut-off upload is never what `--resume_from_checkpoint latest` finds."""
    import fsspec

    from minilora_train.outputs import RunDir

    url = f"memory://rel-{os.getpid()}-{tmp_path.name}/run"
    out = RunDir(url, str(tmp_path))

    def checkpoint(update: int, payload: bytes):
        tmp = out.begin_checkpoint(update)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"update": update}, f)
        with open(os.path.join(tmp, "optimizer.pt"), "wb") as f:
            f.write(payload)
        return out.commit_checkpoint(tmp, update, keep=0)

    checkpoint(1, b"x" * 1000)
    fs = fsspec.filesystem("memory")
    real_put = fs.put

    def put_cut_off(source, target, **kwargs):  # the store keeps only the first half of each object
        real_put(source, target, **kwargs)
        for path in fs.find(target.rstrip("/")) if fs.isdir(target.rstrip("/")) else [target]:
            if path.endswith("optimizer.pt"):
                fs.pipe_file(path, fs.cat_file(path)[:500])

    monkeypatch.setattr(out.fs, "put", put_cut_off)
    with pytest.raises(OSError, match="did not complete; `latest` still names the previous checkpoint"):
        checkpoint(2, b"y" * 1000)
    assert fs.exists(f"{out.root}/checkpoint-2")  # the cut-off folder is there …
    resumed = out.resolve_checkpoint("latest")  # … and is not what a resume finds
    with open(os.path.join(resumed, "trainer_state.json")) as f:
        assert json.load(f)["update"] == 1
    with open(os.path.join(resumed, "optimizer.pt"), "rb") as f:
        assert f.read() == b"x" * 1000


# -- non-finite losses and gradients --------------------------------------------------------------

def arm_nonfinite(model, kind: str, at_update: int):
    """Make training forward number ``at_update`` (one micro-batch an update) non-finite: its
    loss ("loss"), or only its gradient while the loss stays finite ("gradient")."""
    forwards = [0]

    def hook(module, inputs, output):
        if not module.training:
            return None
        forwards[0] += 1
        if forwards[0] != at_update:
            return None
        if kind == "loss":
            return output * float("nan")
        output.register_hook(lambda grad: grad * float("inf"))
        return None

    model.model.layers[0].mlp.register_forward_hook(hook)
    return model


def model_and_tokenizer(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def one_micro_batch(model_dir, data_path, out, *extra) -> list[str]:
    """One micro-batch an update (so forward n is update n), a checkpoint after every update."""
    return argv(model_dir, data_path, out, "--gradient_accumulation_steps", "1", "--save_epoch_percentage", "0.01",
                "--save_total_limit", "0", *extra)


@pytest.mark.parametrize("kind, logging_steps", [("loss", "1"), ("gradient", "10")],
                         ids=["nan-loss-seen-at-logging", "inf-gradient-seen-at-checkpoint"])
def test_a_nonfinite_update_stops_the_run_with_advice_and_keeps_the_last_good_checkpoint(kind, logging_steps,
                                                                                       tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    model, tokenizer = model_and_tokenizer(tiny_model_dir)
    flags = one_micro_batch(tiny_model_dir, data, out, "--logging_steps", logging_steps)
    with pytest.raises(UsageError) as info:
        run(parse_args(flags), model=arm_nonfinite(model, kind, at_update=3), tokenizer=tokenizer)
    message = str(info.value)
    assert "became nan by update 3" in message
    for advice in ("Lower --learning_rate", "--max_grad_norm", "--warmup_steps", "--resume_from_checkpoint latest",
                   "--skip_nonfinite_steps"):
        assert advice in message
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert not (out / "checkpoint-3").exists() and not (out / ".checkpoint-3.partial").exists()
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-2" / ADAPTER).values())
    # The kept checkpoint continues (here without the fault) to a finished run.
    assert run(parse_args(flags + ["--resume_from_checkpoint", "latest"]))["updates"] == 6


@pytest.mark.parametrize("kind, at_update", [("loss", 1), ("gradient", 3)])
def test_skip_nonfinite_steps_undoes_and_counts_the_update(kind, at_update, tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    model, tokenizer = model_and_tokenizer(tiny_model_dir)
    flags = one_micro_batch(tiny_model_dir, data, out, "--skip_nonfinite_steps", "--logging_steps", "2")
    summary = run(parse_args(flags), model=arm_nonfinite(model, kind, at_update), tokenizer=tokenizer)
    assert summary["updates"] == 6 and summary["nonfinite_skipped"] == 1
    assert f"update {at_update}: skipped 1 update(s) with a non-finite loss or gradient" in capsys.readouterr().out
    losses = [m["train_loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)  # the skipped update's loss is left out

    # The skipped update changed nothing: its checkpoint holds what the one before held.
    skipped = out / f"checkpoint-{at_update}"
    weights = load_file(skipped / ADAPTER)
    optimizer = torch.load(skipped / "optimizer.pt", weights_only=True)["state"]
    if at_update == 1:  # before any update: lora_B as initialised (zeros) and no optimizer history
        assert all(not t.any() for k, t in weights.items() if "lora_B" in k)
        assert all(not t.any() for s in optimizer.values() for t in s.values())
    else:
        previous = out / f"checkpoint-{at_update - 1}"
        assert_same_adapter(weights, load_file(previous / ADAPTER))
        before = torch.load(previous / "optimizer.pt", weights_only=True)["state"]
        for index, state in optimizer.items():
            for key, value in state.items():
                assert torch.equal(value, before[index][key]), (index, key)
    assert json.loads((skipped / "trainer_state.json").read_text())["nonfinite_skipped"] == 1
    final = load_file(out / ADAPTER)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert any(not torch.equal(final[k], weights[k]) for k in final)  # training went on after the skip


XLA_SKIP = """
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from conftest import train_argv
from minilora_train.config import parse_args
from minilora_train.loop import run

model, tokenizer = AutoModelForCausalLM.from_pretrained({model!r}), AutoTokenizer.from_pretrained({model!r})
forwards = [0]

def hook(module, inputs, output):
    if module.training:
        forwards[0] += 1
        # nan in update 3 only, as (1,)-shaped device data: every update runs the same graph
        return output * torch.tensor([float("nan") if forwards[0] == 3 else 1.0]).to(output.device)

model.model.layers[0].mlp.register_forward_hook(hook)
summary = run(parse_args(train_argv({model!r}, {data!r}, {out!r}, "--device", "xla", "--skip_nonfinite_steps",
                                    "--max_steps", "6", "--logging_steps", "2", "--general_eval_dataset", "none")),
              model=model, tokenizer=tokenizer)
print(json.dumps({{"xla": summary["xla"], "skipped": summary["nonfinite_skipped"]}}))
"""


def test_skipping_on_xla_needs_no_host_read_and_no_new_graph(tiny_model_dir, data, tmp_path):
    out = tmp_path / "xla"
    result = run_xla(XLA_SKIP.format(model=tiny_model_dir, data=data, out=str(out)),
                     env={"PYTHONPATH": os.path.dirname(__file__)})
    assert result["skipped"] == 1
    assert result["xla"]["compiles_after_warmup"] == 0, result
    assert set(result["xla"]["host_fallbacks_after_warmup"]) <= {"aten::_local_scalar_dense"}, result
    losses = [m["train_loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


# -- under load -----------------------------------------------------------------------------------

def test_long_documents_empty_lines_and_mixed_unicode_pack_into_the_expected_windows(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    long_docs = [" ".join(medical_sentences(250, seed=s)) for s in (1, 2)]  # about 10,000 tokens each
    mixed = ["café au lait, fièvre 39 °C, naïve T-cells", "患者发烧 and cough", "المريض يعاني من الحمى",
             "emoji 🤒💊 in a note", "e\u0301 (decomposed) vs é (composed)", "tab\tand\u00a0nbsp\u200bzero-width"]
    lines = ['{"text": %s}' % json.dumps(long_docs[0]), "", "   ", '{"text": "   "}', '{"text": null}', '{"text": ""}']
    lines += ['{"text": %s}' % json.dumps(t, ensure_ascii=i % 2 == 0) for i, t in enumerate(mixed)]  # raw UTF-8 and \\u escapes
    lines += ['{"text": "\\ud83e\\udd12 surrogate pair escape"}', '{"text": %s}' % json.dumps(long_docs[1])]
    lines += [json.dumps({"text": t}) for t in medical_sentences(30)]
    folder = tmp_path / "export"
    folder.mkdir()
    # A byte-order mark and Windows line ends, as spreadsheet exports write them.
    (folder / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n")
    write_jsonl(folder / "validation.jsonl", [{"text": t} for t in medical_sentences(6, seed=9)])

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = long_docs[:1] + mixed + ["\U0001f912 surrogate pair escape"] + long_docs[1:] + medical_sentences(30)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 2 for t in texts)  # [bos] text [eos]
    length = 64
    expected = tokens // length + (tokens % length >= 2)  # a last partial window only if it predicts something

    summary = run(parse_args(train_argv(tiny_model_dir, folder, tmp_path / "out", "--max_seq_length", str(length),
                                        "--max_steps", "2", "--general_eval_dataset", "none")))
    assert summary["train_windows"] == expected and expected > 300
    assert summary["updates"] == 2 and math.isfinite(summary["final"]["validation"]["loss"])


def test_responses_only_leaves_out_prompts_longer_than_the_window_says_how_many_and_trains(tiny_model_dir, tmp_path,
                                                                                           capsys):
    """One window a micro-batch, a logged loss every update: a window of prompt alone used to make
    an update with no loss tokens, logged as nan and blamed on the learning rate (issue 30)."""
    records = _questions(12, sentences=3) + _questions(28, sentences=0)
    path = write_jsonl(tmp_path / "qa.jsonl", [records[i] for i in torch.randperm(40, generator=torch.Generator().manual_seed(0))])
    out = tmp_path / "out"
    status = main(argv(tiny_model_dir, path, out, "--train_on_responses_only", "--max_seq_length", "96",
                       "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--max_steps", "8"))
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    note = next(line for line in captured.out.splitlines() if line.startswith("note: --train_on_responses_only"))
    counts = re.findall(r"(\d+) of (\d+) (training|validation) examples", note)
    assert sum(int(left) for left, _, _ in counts) == 12 and ("38", "training") in [c[1:] for c in counts], note
    losses = [record["train_loss"] for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "train_loss" in record]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)

