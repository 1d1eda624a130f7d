"""The base's own answers (train/forgetting/answers.py): greedy through the chat template, and cached
on disk so that a later run of the same base reads them instead of generating them again."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tokenizer
from minilora_train.forgetting import answers

def test_the_fingerprint_follows_the_weights_not_the_object(chat_model):
    model, _ = chat_model
    twin = copy.deepcopy(model)
    assert answers.fingerprint(twin) == answers.fingerprint(model)
    with torch.no_grad():
        twin.lm_head.weight[0, 0] += 1e-3
    assert answers.fingerprint(twin) != answers.fingerprint(model)


def test_answers_are_generated_once_then_read_from_the_disk_cache(chat_model, answer_cache, monkeypatch):
    model, tokenizer = chat_model
    prompts = answers.load_prompts()[:5]
    weights = answers.fingerprint(model)
    first = answers.base_answers(model, tokenizer, prompts, 6, weights)
    assert not first.cached and first.seconds > 0 and len(list(answer_cache.glob("*.json"))) == 1
    assert (first.prompt_ids, first.answer_ids) == answers.greedy_answers(model, tokenizer, prompts, 6)

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached answers were generated again")

    monkeypatch.setattr(answers, "greedy_answers", no_generation)
    again = answers.base_answers(model, tokenizer, prompts, 6, weights)
    assert again.cached and (again.prompt_ids, again.answer_ids) == (first.prompt_ids, first.answer_ids)
    assert again.seconds == pytest.approx(first.seconds)  # what the first generation took, kept with them
    # other weights, another answer length or other prompts are other answers
    for call in (lambda: answers.base_answers(model, tokenizer, prompts, 6, "other weights"),
                 lambda: answers.base_answers(model, tokenizer, prompts, 7, weights),
                 lambda: answers.base_answers(model, tokenizer, prompts[:4], 6, weights)):
        with pytest.raises(AssertionError, match="generated again"):
            call()


def test_a_torn_cache_file_is_answered_again(chat_model, answer_cache):
    model, tokenizer = chat_model
    prompts = answers.load_prompts()[:3]
    first = answers.base_answers(model, tokenizer, prompts, 4, "w")
    path, = answer_cache.glob("*.json")
    path.write_text(path.read_text()[:20])  # a kill mid-write of a cache written without the rename
    again = answers.base_answers(model, tokenizer, prompts, 4, "w")
    assert not again.cached and again.answer_ids == first.answer_ids


def test_a_base_without_chat_template_has_no_answers_of_its_own(chat_model, tmp_path):
    model, _ = chat_model
    plain = make_tokenizer(tmp_path / "plain")
    with pytest.raises(ValueError, match="no chat template"):
        answers.base_answers(model, plain, ["Hi"], 4, "w")
