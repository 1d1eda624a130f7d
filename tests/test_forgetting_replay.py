"""Remedies for forgetting (train/forgetting/replay.py): general text and the base's own chat answers mixed
into the training windows, and a base measured once for runs that share it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import train_argv
from minilora_train import data
from minilora_train.forgetting import answers, drift, replay
from minilora_train.config import UsageError, parse_args
from minilora_train.demo_assets import default_general_training, default_general_validation
from minilora_train.loop import run, train_and_report
from minilora_train.outputs import PROBE_FILE, SELF_ANSWERS_FILE

pytestmark = pytest.mark.usefixtures("answer_cache")  # the base's answers go to a fresh cache


def test_replay_text_is_held_apart_from_what_the_forgetting_check_scores():
    distill = answers.load_prompts(answers.DISTILL_PROMPTS_FILE)
    probe = answers.load_prompts()
    assert len(distill) >= 100 and len(set(distill)) == len(distill)
    assert not set(distill) & set(probe)
    training, validation = default_general_training(), default_general_validation()
    assert len(training) > 10 * len(validation) and not set(training) & set(validation)


def windows(n: int, value: int) -> data.Windows:
    return data.Windows(torch.full((n, 4), value), torch.full((n, 4), value))


def test_mix_gives_each_pool_its_share_of_the_whole_and_repeats_a_small_pool():
    medical, general, own = windows(60, 0), windows(1000, 1), windows(7, 2)
    mixed = replay.mix(medical, [(general, 0.1), (own, 0.25)], seed=0)
    counts = torch.bincount(mixed.input_ids[:, 0], minlength=3).tolist()
    assert counts == [60, 9, 23]  # 60 * 0.1 / 0.65 and 60 * 0.25 / 0.65, rounded
    assert torch.equal(mixed.input_ids[:60], medical.input_ids)
    # the first pass over a small pool takes every window once before any repeats
    rows = torch.arange(7).unsqueeze(1).expand(7, 4)
    mixed = replay.mix(medical, [(data.Windows(rows, rows), 0.25)], seed=1)
    taken = mixed.input_ids[60:, 0].tolist()
    assert len(taken) == 20 and sorted(taken[:7]) == list(range(7))
    with pytest.raises(UsageError, match="below 1"):
        replay.mix(medical, [(general, 0.5), (own, 0.5)], seed=0)


@pytest.mark.parametrize("flags, message", [
    (["--replay_general", "1"], r"--replay_general must be in \[0, 1\)"),
    (["--replay_self", "-0.1"], r"--replay_self must be in \[0, 1\)"),
    (["--replay_general", "0.6", "--replay_self", "0.5"], "must stay below 1"),
    (["--replay_general_dataset", "/tmp"], "needs --replay_general"),
])
def test_bad_replay_settings_are_refused_in_one_line(flags, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        parse_args(["--model_name", "x", "--dataset_dir", str(tmp_path), *flags])


def test_a_run_with_both_remedies_trains_on_the_mixed_windows(instruct_dir, tiny_text_file, tmp_path, monkeypatch):
    probes = []
    original = drift.probe_base
    monkeypatch.setattr(drift, "probe_base", lambda *a, **k: probes.append(1) or original(*a, **k))
    out = tmp_path / "run"
    argv = train_argv(instruct_dir, tiny_text_file, out, "--max_steps", "2", "--chat_drift_prompts", "3",
                      "--replay_general", "0.2", "--replay_self", "0.2", "--compare_full_finetune",
                      "--full_finetune_learning_rate", "1e-3")
    plain = run(parse_args(train_argv(instruct_dir, tiny_text_file, tmp_path / "plain", "--max_steps", "1",
                                      "--chat_drift_prompts", "0", "--general_eval_dataset", "none",
                                      "--replay_self", "0")))
    summary = train_and_report(parse_args(argv))
    assert summary["replay"] == {"general": 0.2, "self": 0.2}
    medical = plain["train_windows"]
    assert summary["train_windows"] == medical + 2 * round(medical * 0.2 / 0.6)
    pairs = json.loads((out / SELF_ANSWERS_FILE).read_text())
    assert len(pairs) == len(answers.load_prompts(answers.DISTILL_PROMPTS_FILE))
    assert all(1 <= len(a) <= replay.DISTILL_ANSWER_TOKENS for _, a in pairs)
    # the full fine-tuning run starts from the same base: its evaluation and chat answers are reused
    full = summary["full_finetune"]
    assert len(probes) == 1 and full["base"] == summary["base"]
    assert full["chat_drift"]["base_nll"] == summary["chat_drift"]["base_nll"]
    assert json.loads((out / "full_finetune" / PROBE_FILE).read_text()) == json.loads(
        (out / PROBE_FILE).read_text())


def test_replay_needs_windows_in_memory_and_self_distillation_an_instruct_base(tiny_model_dir, tiny_text_file, tmp_path):
    with pytest.raises(UsageError, match="not --streaming_data"):
        run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "a", "--max_steps", "1",
                                  "--streaming_data", "--replay_general", "0.1")))
    with pytest.raises(UsageError, match="needs an instruct base"):
        run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "b", "--max_steps", "1",
                                  "--replay_self", "0.1")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_report_names_the_method_that_forgot_less_only_at_comparable_medical_gain():
    from minilora_train.forgetting.report import _comparison

    lora = {"medical_change_percent": -30.0, "general_change_percent": 2.0, "chat_drift": 0.10}
    full = {"medical_change_percent": -33.0, "general_change_percent": 4.0, "chat_drift": 0.20}
    verdict = _comparison(lora, full)
    assert verdict.startswith("The two adapted comparably")
    assert "LoRA moved less" in verdict and "LoRA forgot less" in verdict
    verdict = _comparison({**lora, "chat_drift": 0.3, "general_change_percent": 5.0}, full)
    assert "moved NOT less" in verdict and "did NOT forget less" in verdict
    verdict = _comparison({**lora, "medical_change_percent": -50.0}, full)
    assert "did not adapt comparably" in verdict and "LoRA learned more" in verdict
    assert "forgot less" not in verdict and "moved less" not in verdict


def test_the_guard_is_on_by_default_for_an_instruct_base_and_off_with_replay_self_0(instruct_dir, tiny_text_file,
                                                                                    tmp_path):
    from minilora_train.config import GUARD_SHARE

    def argv(name, *extra):
        return parse_args(train_argv(instruct_dir, tiny_text_file, tmp_path / name, "--max_steps", "1",
                                     "--chat_drift_prompts", "2", "--general_eval_dataset", "none", *extra))

    guarded = train_and_report(argv("guarded"))
    off = run(argv("off", "--replay_self", "0"))
    guard, medical = guarded["forgetting_guard"], off["train_windows"]
    assert guard["share"] == guarded["replay"]["self"] == GUARD_SHARE
    assert guard["medical_windows"] == medical and guard["prompts"] == len(answers.load_prompts(answers.DISTILL_PROMPTS_FILE))
    assert guarded["train_windows"] == medical + guard["windows"] == medical + round(medical * GUARD_SHARE / (1 - GUARD_SHARE))
    assert not guard["answers_cached"] and guard["answer_seconds"] > 0 and guard["steps_fixed"]
    assert off["forgetting_guard"] == {"share": 0.0, "note": "off (--replay_self 0)"}
    report = (tmp_path / "guarded" / "report.md").read_text()
    assert f"| forgetting guard (the base's own answers) | {100 * GUARD_SHARE:.0f}% of the windows |" in report
    assert "Forgetting guard: on" in report and "--replay_self 0 turns it off" in report
    # a later run of the same base reads the answers back: the guard costs no generation then
    again = run(argv("again"))["forgetting_guard"]
    assert again["answers_cached"] and again["answer_seconds"] == 0.0 and again["windows"] == guard["windows"]


def test_the_guard_stays_off_where_it_cannot_run(tiny_model_dir, instruct_dir, tiny_text_file, tmp_path):
    plain = run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "plain", "--max_steps", "1",
                                      "--general_eval_dataset", "none")))
    assert plain["forgetting_guard"]["share"] == 0.0 and "no chat template" in plain["forgetting_guard"]["note"]
    streamed = run(parse_args(train_argv(instruct_dir, tiny_text_file, tmp_path / "streamed", "--max_steps", "1",
                                         "--streaming_data", "--general_eval_dataset", "none",
                                         "--chat_drift_prompts", "1")))
    assert "--streaming_data" in streamed["forgetting_guard"]["note"]
