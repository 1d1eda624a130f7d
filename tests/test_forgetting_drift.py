"""Chat drift (train/forgetting/drift.py): the base's own greedy answers to everyday prompts, scored again
after fine-tuning. Tiny Llama with a chat template; the real instruct base is probed by the demo."""

from __future__ import annotations

import json

import pytest

import minilora
from conftest import make_tokenizer, randomize_adapters
from minilora_train.forgetting import answers, drift

pytestmark = pytest.mark.usefixtures("answer_cache")  # the base's answers go to a fresh cache


def test_shipped_prompts_are_at_least_fifty_distinct_everyday_requests():
    prompts = answers.load_prompts()
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)


def test_an_unchanged_model_has_zero_drift_and_an_adapter_moves_it(chat_model):
    model, tokenizer = chat_model
    prompts = answers.load_prompts()[:6]
    probe = drift.probe_base(model, tokenizer, prompts, max_new_tokens=5)
    assert len(probe.answer_ids) == 6 and all(1 <= len(a) <= 5 for a in probe.answer_ids)
    # each answer is the base's greedy continuation of its own templated prompt
    assert probe.prompt_ids[0] == tokenizer.apply_chat_template(
        [{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert drift.chat_drift(model, probe)["drift"] == 0.0

    minilora.inject(model, r=4)
    randomize_adapters(model, std=0.3)
    moved = drift.chat_drift(model, probe)
    assert moved["drift"] > 0 and moved["base_nll"] == probe.base_nll
    assert moved["prompts"] == 6 and moved["tokens"] == probe.tokens
    with minilora.disable_adapters(model):
        assert drift.chat_drift(model, probe)["drift"] == 0.0  # the base, bit for bit


def test_a_base_without_chat_template_and_bad_prompt_files_are_refused(chat_model, tmp_path):
    model, _ = chat_model
    plain = make_tokenizer(tmp_path / "plain")
    with pytest.raises(ValueError, match="no chat template"):
        drift.probe_base(model, plain)
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected"):
        answers.load_prompts(str(bad))


def test_a_training_run_on_an_instruct_base_reports_its_chat_drift(instruct_dir, tiny_text_file, tmp_path):
    from conftest import train_argv
    from minilora_train.config import parse_args
    from minilora_train.loop import train_and_report

    out = tmp_path / "run"
    summary = train_and_report(parse_args(train_argv(instruct_dir, tiny_text_file, out, "--max_steps", "3",
                                                     "--chat_drift_prompts", "4", "--general_eval_dataset", "none",
                                                     "--eval_steps", "1")))
    chat = summary["chat_drift"]
    # measured after every evaluation but the base's, so a run traces drift against medical gain
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_tag" in line]
    assert [(e["update"], e["eval_tag"], "chat_drift" in e) for e in evals] == [
        (0, "base", False), (1, "eval", True), (2, "eval", True), (3, "final", True)]
    assert evals[-1]["chat_drift"] == chat["drift"]
    assert chat["prompts"] == 4 and chat["drift"] != 0.0  # three updates at 5e-3 move the answers' likelihood
    probe = json.loads((out / "chat_probe.json").read_text())
    assert probe["base_nll"] == chat["base_nll"] and len(probe["answer_ids"]) == 4
    report = json.loads((out / "report.json").read_text())
    assert report["methods"][0]["chat_drift"] == chat["drift"]
    assert "chat drift on everyday prompts" in (out / "report.md").read_text()


def test_a_base_without_chat_template_reports_why_there_is_no_drift(tiny_model_dir, tiny_text_file, tmp_path):
    from conftest import train_argv
    from minilora_train.config import parse_args
    from minilora_train.loop import train_and_report

    out = tmp_path / "plain"
    summary = train_and_report(parse_args(train_argv(tiny_model_dir, tiny_text_file, out, "--max_steps", "1",
                                                     "--general_eval_dataset", "none")))
    assert "chat template" in summary["chat_drift"]["not_measured"]
    assert "chat_drift" not in json.loads((out / "report.json").read_text())["methods"][0]
    assert "Chat drift: not measured" in (out / "report.md").read_text()
