"""The medical multiple-choice questions in every run (train/forgetting/mc.py): intervals, the paired
test that says when 40 questions cannot tell two models apart, and a run that reports them."""

from __future__ import annotations

import json

import pytest

from conftest import train_argv
from minilora_train.config import UsageError, parse_args
from minilora_train.forgetting import mc
from minilora_train.loop import run, train_and_report


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics in
    # Medicine 17:857, its worked examples by method 3 (score, no continuity correction): 81/263 0.2553-0.3662,
    # 0/20 0.0000-0.1611, 1/29 0.0061-0.1718.
    assert mc.wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert mc.wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=5e-5)
    assert mc.wilson(1, 29) == pytest.approx((0.0061, 0.1718), abs=5e-5)
    lo, hi = mc.wilson(20, 40)
    assert lo == pytest.approx(1 - hi) and hi - lo > 0.29  # half of 40 right: an interval about 30 points wide
    with pytest.raises(ValueError, match="at least one"):
        mc.wilson(0, 0)


def test_mcnemar_is_the_exact_binomial_on_the_questions_that_changed():
    assert mc.mcnemar_p(0, 0) == 1.0
    assert mc.mcnemar_p(5, 0) == pytest.approx(2 / 32)  # all five discordant one way: 2 * (1/2)^5
    assert mc.mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mc.mcnemar_p(3, 3) == 1.0


def result(correct: list[bool]) -> dict:
    return {"correct": correct, "n": len(correct), "accuracy": sum(correct) / len(correct)}


def test_forty_questions_say_plainly_when_they_cannot_tell_two_models_apart():
    base = [True] * 20 + [False] * 20
    adapted = [False, False] + [True] * 18 + [True] * 4 + [False] * 16  # 4 gained, 2 lost: 22/40 against 20/40
    c = mc.compare(result(base), result(adapted))
    assert (c["base"]["correct"], c["adapted"]["correct"], c["gained"], c["lost"]) == (20, 22, 4, 2)
    assert c["p_value"] == pytest.approx(2 * (1 + 6 + 15) / 64) and not c["distinguishable"]
    assert "40 questions cannot tell these two models apart" in c["text"]
    assert "20/40 (50%, 95% interval 35-65%)" in c["text"]
    far = [False] * 10 + [True] * 30  # 10 questions lost, none gained
    c = mc.compare(result([True] * 40), result(far))
    assert c["distinguishable"] and "The base is better on these questions beyond chance" in c["text"]
    with pytest.raises(ValueError, match="different question sets"):
        mc.compare(result(base), result(adapted[:10]))


def test_every_run_scores_the_shipped_questions_with_the_base_and_the_adapted_model(tiny_model_dir, tiny_text_file,
                                                                                     tmp_path):
    out = tmp_path / "run"
    summary = train_and_report(parse_args(train_argv(tiny_model_dir, tiny_text_file, out, "--max_steps", "2",
                                                     "--general_eval_dataset", "none")))
    choice = summary["medical_mc"]
    assert choice["n"] == 40 and len(mc.items_for(None)) == 40
    assert 0 <= choice["base"]["correct"] <= 40 and choice["gained"] + choice["lost"] <= 40
    assert json.loads((out / "medical_mc_base.json").read_text())["n"] == 40  # a resumed run compares with it
    report = (out / "report.md").read_text()
    assert "| medical multiple choice, base |" in report and "Medical multiple choice: the base answered" in report
    off = run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "off", "--max_steps", "1",
                                    "--general_eval_dataset", "none", "--mc_file", "none")))
    assert off["medical_mc"] == {"not_measured": "off (--mc_file none)"}


def test_a_bad_question_file_is_refused_before_anything_is_written(tiny_model_dir, tiny_text_file, tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"prompt": "Q?", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(UsageError, match=r"--mc_file .*line 1: choices must be a list of at least two"):
        run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "run", "--mc_file", str(bad))))
    assert not (tmp_path / "run").exists()
