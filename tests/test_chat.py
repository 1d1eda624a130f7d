"""train/chat.py and --chat_template: question/answer records through the tokenizer's chat
template, the loss on the answer tokens only, and minilora-generate prompting the same way."""

from __future__ import annotations

import json

import pytest

from conftest import make_tokenizer, train_argv, write_jsonl
from minilora_train.chat import chat_parts, chat_prompt
from minilora_train.config import UsageError
from minilora_train.data import IGNORE, Packer

# SmolLM2-Instruct's template (ChatML with a default system turn), as its tokenizer carries it.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has ChatML special tokens and template."""
    from conftest import medical_sentences, tiny_llama

    path = tmp_path_factory.mktemp("chat-model")
    tokenizer = make_tokenizer(path, medical_sentences(200) + ["question answer system user assistant"] * 20)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id).save_pretrained(path)
    return path


def test_a_record_splits_into_the_inference_prompt_and_the_answer_with_its_end_of_turn(chat_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    prompt, response = chat_parts(tokenizer, "What is a fever?", None, " A raised temperature. ")
    assert prompt == chat_prompt(tokenizer, "What is a fever?")
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is a fever?<|im_end|>" in prompt
    assert response == "A raised temperature.<|im_end|>\n"
    with_context = chat_prompt(tokenizer, "Which dose?", "Adult patient, 70 kg.")
    assert "<|im_start|>user\nAdult patient, 70 kg.\n\nWhich dose?<|im_end|>" in with_context


def test_packed_chat_records_carry_loss_on_answer_tokens_only_and_no_extra_bos_or_eos(chat_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    record = {"question": "What is a fever?", "answer": "A raised temperature."}
    packer = Packer(tokenizer, 512, responses_only=True, chat_template=True)
    ((ids, labels),) = packer.encode([record], "qa")
    prompt, response = chat_parts(tokenizer, record["question"], None, record["answer"])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert ids == prompt_ids + response_ids  # the template's own markers, no bos/eos added around them
    assert labels == [IGNORE] * len(prompt_ids) + response_ids
    windows = packer.pack({"question": [record["question"]] * 3, "answer": [record["answer"]] * 3}, "qa")
    assert windows.real_tokens == 3 * len(response_ids)


def test_chat_template_needs_a_tokenizer_that_has_one(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(UsageError, match="has no chat template"):
        Packer(tokenizer, 64, chat_template=True).encode([{"question": "q?", "answer": "a"}], "qa")


def test_minilora_generate_needs_only_the_adapter_after_a_chat_template_run(chat_model_dir, tmp_path, capsys, monkeypatch):
    """Train with --chat_template; then `minilora-generate --adapter DIR QUESTION` finds the base in
    the adapter's config and prompts through the chat template, as the run trained."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # the forgetting guard caches the base's answers
    import torch

    from minilora_train.cli import main as train_main
    from minilora_train.inference import generate_text, load_lora_model
    from minilora_train.inference import main as generate_main

    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"What helps {w}?", "answer": f"Rest helps {w}."}
                                               for w in ("fever", "cough", "pain", "renal", "acute") * 8])
    out = tmp_path / "out"
    assert train_main(train_argv(chat_model_dir, data, out, "--chat_template", "--train_on_responses_only",
                                 "--max_steps", "2", "--general_eval_dataset", "none",
                                 "--max_seq_length", "96")) == 0  # a window holds a templated question (~70 tokens)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(chat_model_dir)
    capsys.readouterr()
    assert generate_main(["--adapter", str(out), "--max_new_tokens", "5", "What helps fever?"]) == 0
    printed = capsys.readouterr().out

    model, tokenizer = load_lora_model(str(chat_model_dir), str(out), device="cpu")
    torch.manual_seed(0)
    expected = generate_text(model, tokenizer, chat_prompt(tokenizer, "What helps fever?"), 5, add_special_tokens=False)
    assert printed == f"### Prompt\nWhat helps fever?\n### Generated\n{expected}\n\n"
