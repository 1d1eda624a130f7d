"""train/evaluate.py: perplexity against a hand computation, multiple-choice scoring against a
bigram model whose log-likelihoods are known in closed form, the shipped question set, and
minilora-eval end to end."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from torch import nn

import minilora
from conftest import randomize_adapters, tiny_llama
from test_inference import VOCAB, one_thread, save_adapter_dir, tiny_tokenizer  # noqa: F401 (one_thread: autouse)
from minilora_train.evaluate import (DEFAULT_MC_FILE, GENERAL_PROMPTS, MC_CATEGORIES, general_generations,
                            load_multiple_choice, main, perplexity, score_multiple_choice)
from minilora_train.inference import generate_text

# -- perplexity -----------------------------------------------------------------------------------


def windows(seed=0, n=5, length=12, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, 7:] = -100  # padding at the end
    labels[4, 1::2] = -100
    return ids, labels


def hand_nll(model, ids, labels):
    """Token by token: -log softmax(logits at t)[label at t + 1], over labels that are not -100."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row, row_labels in zip(ids, labels):
            logits = model(input_ids=row[None]).logits[0].double()  # (L, V)
            for t in range(len(row) - 1):
                if row_labels[t + 1] != -100:
                    total -= torch.log_softmax(logits[t], -1)[row_labels[t + 1]].item()
                    count += 1
    return total, count


def test_perplexity_is_exp_of_the_mean_token_nll():
    model = tiny_llama()
    ids, labels = windows()
    total, count = hand_nll(model, ids, labels)
    result = perplexity(model, ids, labels, batch_size=2)  # 5 windows: batches of 2, 2, 1
    # 11 predicted positions a window, less the -100s among positions 1..11: 3 + 5 + 6
    assert result["tokens"] == count == 5 * 11 - 3 - 5 - 6
    assert result["loss"] == pytest.approx(total / count, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)
    # transformers' own causal-LM loss over the whole set in one call is the same mean.
    with torch.no_grad():
        assert result["loss"] == pytest.approx(model(input_ids=ids, labels=labels).loss.item(), rel=1e-5)
    # Unlabelled: every next token counts.
    assert perplexity(model, ids)["tokens"] == 5 * 11


def test_perplexity_is_the_same_for_an_adapter_and_its_merged_model():
    model = tiny_llama()
    ids, labels = windows(seed=1)
    base = perplexity(model, ids, labels)
    minilora.inject(model, r=4)
    randomize_adapters(model, std=0.2)
    adapted = perplexity(model, ids, labels)
    merged = perplexity(minilora.merge_and_unload(model), ids, labels)
    assert adapted["loss"] != pytest.approx(base["loss"], rel=1e-4)
    assert merged["loss"] == pytest.approx(adapted["loss"], rel=1e-5)


def test_perplexity_refuses_a_set_with_nothing_to_predict():
    ids, _ = windows()
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]  # the first position is never predicted
    with pytest.raises(ValueError, match="no token is predicted"):
        perplexity(tiny_llama(), ids, labels)


# -- multiple choice ------------------------------------------------------------------------------

class Bigram(nn.Module):
    """logits at t depend on token t only, so log P(continuation) = Σ log softmax(table[prev])[next]."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.table[input_ids])


def continuation(tokenizer, prompt, choice):
    prompt_ids, full = tokenizer(prompt)["input_ids"], tokenizer(prompt + " " + choice)["input_ids"]
    assert full[:len(prompt_ids)] == prompt_ids  # this tokenizer splits at spaces: no merge at the boundary
    return full[len(prompt_ids) - 1:]  # the last prompt token, then the choice's tokens


def bigram_logprob(model, tokens):
    logprobs = torch.log_softmax(model.table.detach().double(), -1)
    return sum(logprobs[a, b].item() for a, b in zip(tokens, tokens[1:]))


def test_multiple_choice_picks_the_likeliest_choice_by_summed_log_likelihood():
    tokenizer, model = tiny_tokenizer(), Bigram(VOCAB)
    prompt = "The patient presented with"
    choices = ["chest pain", "shortness of breath", "aspirin and oxygen"]
    with torch.no_grad():  # make choice 1 the likeliest, by a wide margin
        tokens = continuation(tokenizer, prompt, choices[1])
        for a, b in zip(tokens, tokens[1:]):
            model.table[a, b] += 20.0
    result = score_multiple_choice(model, tokenizer, [{"prompt": prompt, "choices": choices, "answer": 1}])
    item = result["items"][0]
    assert item["prediction"] == 1 and item["answer"] == 1 and result["accuracy"] == 1.0
    hand = [bigram_logprob(model, continuation(tokenizer, prompt, c)) for c in choices]
    assert item["logprobs"] == pytest.approx(hand, rel=1e-5, abs=1e-5)  # float32 model vs float64 by hand

    mean = score_multiple_choice(model, tokenizer, [{"prompt": prompt, "choices": choices, "answer": 1}],
                                 normalize="mean")["items"][0]["logprobs"]
    lengths = [len(continuation(tokenizer, prompt, c)) - 1 for c in choices]
    assert mean == pytest.approx([h / n for h, n in zip(hand, lengths)], rel=1e-5, abs=1e-5)


def test_multiple_choice_scores_on_a_llama_do_not_depend_on_padding():
    tokenizer, model = tiny_tokenizer(), tiny_llama(vocab_size=VOCAB)
    prompt, choices = "The patient presented with", ["pain", "shortness of breath and chest pain"]
    scores = score_multiple_choice(model, tokenizer, [{"prompt": prompt, "choices": choices, "answer": 0}])
    hand = []
    with torch.no_grad():  # each choice alone, unpadded
        for choice in choices:
            tokens = continuation(tokenizer, prompt, choice)
            full = tokenizer(prompt)["input_ids"][:-1] + tokens
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), -1)
            start = len(full) - len(tokens)
            hand.append(sum(logprobs[t, full[t + 1]].item() for t in range(start, len(full) - 1)))
    assert scores["items"][0]["logprobs"] == pytest.approx(hand, rel=1e-5)


def test_multiple_choice_accuracy_per_category():
    tokenizer, model = tiny_tokenizer(), Bigram(VOCAB, seed=3)
    prompt, choices = "Blood pressure was", ["high", "fast", "short"]
    scores = score_multiple_choice(model, tokenizer, [{"prompt": prompt, "choices": choices, "answer": 0}])
    best = scores["items"][0]["prediction"]
    wrong = (best + 1) % 3
    items = [
        {"prompt": prompt, "choices": choices, "answer": best, "category": "safety_responses"},
        {"prompt": prompt, "choices": choices, "answer": wrong, "category": "safety_responses"},
        {"prompt": prompt, "choices": choices, "answer": choices[best], "category": "medical_terminology"},  # by text
    ]
    result = score_multiple_choice(model, tokenizer, items)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["per_category"] == {"medical_terminology": {"accuracy": 1.0, "n": 1},
                                      "safety_responses": {"accuracy": 0.5, "n": 2}}
    assert [r["correct"] for r in result["items"]] == [True, False, True]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Q", "choices": ["a", "b"]}', "line 2: missing answer"),
    ('{"prompt": "Q", "choices": ["a", "b"], "answer": 2}', r"line 2: answer=2; give an index 0\.\.1"),
    ('{"prompt": "Q", "choices": ["a", "b"], "answer": "c"}', "line 2: answer 'c' is not one of the choices"),
    ('{"prompt": "Q", "choices": ["a"], "answer": 0}', "line 2: choices must be a list of at least two"),
    ('{"prompt": "", "choices": ["a", "b"], "answer": 0}', "line 2: prompt must be non-empty"),
    ('{"prompt": "Q", "choices": ["a", "b"], "answer": 0', "line 2: not valid JSON"),
])
def test_load_multiple_choice_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"prompt": "Q", "choices": ["a", "b"], "answer": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_multiple_choice(str(path))


def test_the_shipped_medical_set_loads_and_covers_the_four_categories():
    items = load_multiple_choice(DEFAULT_MC_FILE)
    assert len(items) >= 40
    assert {i["category"] for i in items} == set(MC_CATEGORIES)
    assert all(len(i["choices"]) == 4 for i in items)
    assert len({i["answer"] for i in items}) == 4  # the right answer is not always in the same place
    assert len({i["prompt"] for i in items}) == len(items)


# -- general capabilities and the command line ----------------------------------------------------

def test_general_generations_answer_the_four_general_prompts():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=VOCAB)
    out = general_generations(model, tokenizer, max_new_tokens=4)
    assert [g["prompt"] for g in out] == list(GENERAL_PROMPTS)
    # Batched with left padding, yet each row is what that prompt gives alone.
    assert out[2]["response"] == generate_text(model, tokenizer, GENERAL_PROMPTS[2], max_new_tokens=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    base = str(root / "base")
    tiny_llama(vocab_size=VOCAB).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    return {"base": base, "adapter": save_adapter_dir(base, str(root / "adapter"), seed=1)}


def test_cli_compares_base_and_adapter_and_writes_json(saved, tmp_path, monkeypatch, capsys):
    ids, labels = windows(vocab=VOCAB)
    calls = []

    def load_windows(dataset_dir, tokenizer, max_seq_length, *, dataset_format=None):  # minilora_train.data's contract
        calls.append((dataset_dir, max_seq_length, dataset_format))
        return types.SimpleNamespace(input_ids=ids, labels=labels)

    monkeypatch.setitem(sys.modules, "minilora_train.data", types.SimpleNamespace(load_windows=load_windows))
    mc_file = tmp_path / "mc.jsonl"
    mc_file.write_text("".join(json.dumps(i) + "\n" for i in load_multiple_choice(DEFAULT_MC_FILE)[:6]))
    output = tmp_path / "out" / "eval.json"
    assert main(["--base_model", saved["base"], "--adapter", saved["adapter"], "--compare_base",
                 "--dataset_dir", "data/val", "--max_seq_length", "12", "--mc_file", str(mc_file),
                 "--general_prompts", "--max_new_tokens", "3", "--output_json", str(output)]) == 0
    assert calls == [("data/val", 12, None)]

    report = json.loads(output.read_text())
    assert list(report["results"]) == ["base", "adapter"]
    base, adapter = report["results"]["base"], report["results"]["adapter"]
    from minilora_train.inference import load_lora_model

    model, _ = load_lora_model(saved["base"], saved["adapter"])
    assert adapter["perplexity"] == pytest.approx(perplexity(model, ids, labels))
    with minilora.disable_adapters(model):
        assert base["perplexity"] == pytest.approx(perplexity(model, ids, labels))
    assert len(adapter["multiple_choice"]["items"]) == 6 and len(adapter["general"]) == 4
    out = capsys.readouterr().out
    assert "perplexity" in out and "accuracy" in out and "Translate 'Hello world' to Spanish" in out


def test_cli_rejects_a_bad_question_file_before_loading_a_model(tmp_path, capsys):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"prompt": "Q", "choices": ["a", "b"], "answer": 5}\n')
    assert main(["--base_model", str(tmp_path / "does-not-exist"), "--mc_file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minilora-eval: error: ") and "line 1" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, words", [
    (["--torch_dtype", "float99"], "torch_dtype='float99' is not a torch dtype"),
    (["--adapter", "{other}"], "does not fit this model"),
    (["--base_model", "{tmp}/no-such-model"], "no-such-model"),
    (["--max_seq_length", "1", "--dataset_dir", "{tmp}"], "--max_seq_length must be at least 2"),
], ids=["bogus-dtype", "adapter-for-another-base", "base-missing", "window-of-one"])
def test_cli_errors_are_one_line_and_exit_2(saved, flags, words, tmp_path, capsys):
    other = tmp_path / "other-adapter"
    minilora.save_adapter(minilora.inject(tiny_llama(hidden_size=32, intermediate_size=64), r=2), other)
    flags = [f.replace("{other}", str(other)).replace("{tmp}", str(tmp_path)) for f in flags]
    assert main(["--base_model", saved["base"], "--skip_mc", *flags]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("minilora-eval")]  # not transformers' progress bars
    assert len(lines) == 1 and lines[0].startswith("minilora-eval: error: ") and words in lines[0], err
    assert "Traceback" not in err
