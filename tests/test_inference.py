"""train/inference.py: load_lora_model, generate_text, AdapterManager and minilora-generate, on
tiny Llamas saved to disk with a tiny byte-level BPE tokenizer (no downloads)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import minilora
from conftest import randomize_adapters, tiny_llama
from minilora_train.inference import AdapterManager, generate_text, load_lora_model, local_adapter_dir, main

CORPUS = [
    "The patient presented with chest pain and shortness of breath.",
    "The differential diagnosis includes myocardial infarction, pulmonary embolism and pneumonia.",
    "Blood pressure was high and the heart rate was fast.",
    "Treatment started with aspirin and oxygen.",
    "Hello world, this is a short story about friendship.",
]
VOCAB = 320  # the model's vocab_size; the tokenizer's ~300 tokens fit inside it
PROMPTS = ["The patient presented with", "Hello", "Blood pressure was high and the heart"]
NEW_TOKENS = 8


def tiny_tokenizer(extra_tokens=()):
    """A byte-level BPE trained on CORPUS, ids 0/1/2 = <pad>/<s>/</s> as tiny_llama_config expects."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if extra_tokens:
        hf.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return hf


def save_adapter_dir(base_dir: str, path: str, seed: int, **lora) -> str:
    """A trained-looking adapter: injected into the saved base, B made non-zero, saved as PEFT's format."""
    model = load_lora_model(base_dir)[0]
    minilora.inject(model, **{"r": 4, **lora})
    randomize_adapters(model, seed=seed, std=0.2)
    minilora.save_adapter(model, path, base_model_name_or_path=base_dir)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core runner spinning OpenMP
    threads made each one many times slower; the setting is restored for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{base, a, b}: a saved tiny Llama with its tokenizer, and two adapters (b adapts fewer layers)."""
    root = tmp_path_factory.mktemp("inference")
    base = str(root / "base")
    tiny_llama(vocab_size=VOCAB).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    a = save_adapter_dir(base, str(root / "adapter-a"), seed=1)
    b = save_adapter_dir(base, str(root / "adapter-b"), seed=2, target_modules=["q_proj", "v_proj"])
    return {"base": base, "a": a, "b": b}


def generations(model, tokenizer, prompts=PROMPTS[::2]):
    return [generate_text(model, tokenizer, p, max_new_tokens=NEW_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def expected(dirs):
    """Greedy generations of the base alone and with each adapter, each loaded on its own."""
    return {key: generations(*load_lora_model(dirs["base"], None if key == "base" else dirs[key]))
            for key in ("base", "a", "b")}


# -- load_lora_model / generate_text --------------------------------------------------------------

def test_greedy_generation_is_deterministic_and_the_adapter_changes_it(dirs, expected):
    model, tokenizer = load_lora_model(dirs["base"], dirs["a"])
    assert minilora.active_adapter(model) == "default"
    assert generations(model, tokenizer) == expected["a"]
    assert expected["a"] != expected["base"]


def test_greedy_is_the_default_even_when_the_models_generation_config_samples(dirs, expected):
    model, tokenizer = load_lora_model(dirs["base"], dirs["a"])
    # Llama 3.2's generation_config.json ships do_sample=True, temperature=0.6, top_p=0.9.
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9)
    assert generations(model, tokenizer) == expected["a"]


def test_generate_text_returns_only_the_new_text(dirs):
    model, tokenizer = load_lora_model(dirs["base"], dirs["a"])
    prompt = PROMPTS[0]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(full[0, ids.shape[1]:], skip_special_tokens=True)
    assert generate_text(model, tokenizer, prompt, max_new_tokens=NEW_TOKENS) == expected


def test_merged_model_generates_what_the_unmerged_one_does(dirs, expected):
    model, tokenizer = load_lora_model(dirs["base"], dirs["a"])
    merged, _ = load_lora_model(dirs["base"], dirs["a"], merge=True)
    assert not list(minilora.lora_modules(merged))  # plain Linear layers: no adapter overhead left
    assert generations(merged, tokenizer) == expected["a"]
    ids = tokenizer(PROMPTS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_adapter_loads_from_an_fsspec_url_with_its_tokenizer(dirs, expected):
    import fsspec

    fs = fsspec.filesystem("memory")
    url = "memory://bucket/adapter-a"
    for name in os.listdir(dirs["a"]):
        fs.put(os.path.join(dirs["a"], name), f"{url}/{name}")
    # A tokenizer saved with the adapter wins over the base's (training may add tokens).
    local_tok = os.path.join(os.path.dirname(dirs["a"]), "adapter-tok")
    tiny_tokenizer(extra_tokens=["<note>"]).save_pretrained(local_tok)
    for name in os.listdir(local_tok):
        fs.put(os.path.join(local_tok, name), f"{url}/{name}")
    try:
        model, tokenizer = load_lora_model(dirs["base"], url)
        assert "<note>" in tokenizer.get_vocab()
        assert generations(model, tokenizer) == expected["a"]
    finally:
        fs.rm("/bucket", recursive=True)


def test_missing_adapter_url_names_what_was_found():
    import fsspec

    fsspec.filesystem("memory").pipe("/empty-adapter/README.md", b"nothing here")
    with pytest.raises(minilora.AdapterLoadError, match="has no adapter_config.json.*README.md"):
        with local_adapter_dir("memory://empty-adapter"):
            pass


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_an_adapter_trained_with_peft_loads_and_computes_the_same(dirs, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(dirs["base"])
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    model, tokenizer = load_lora_model(dirs["base"], str(tmp_path / "peft-adapter"))
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)


# -- AdapterManager -------------------------------------------------------------------------------

def base_parameter_ids(model) -> dict[str, int]:
    return {n: id(p) for n, p in model.named_parameters() if ".adapters." not in n}


def test_switching_adapters_is_correct_and_never_reloads_the_base(dirs, expected):
    manager = AdapterManager(dirs["base"])
    before = base_parameter_ids(manager.model)
    manager.load_adapter("a", dirs["a"])
    manager.load_adapter("b", dirs["b"])
    assert manager.adapters == ["a", "b"] and manager.active_adapter == "b"
    model_a = manager.switch_adapter("a")
    assert generations(model_a, manager.tokenizer) == expected["a"]
    model_b = manager.switch_adapter("b")
    assert model_b is model_a is manager.model
    assert generations(model_b, manager.tokenizer) == expected["b"]
    assert manager.generate("a", PROMPTS[0], max_new_tokens=NEW_TOKENS) == expected["a"][0]
    assert manager.active_adapter == "b"  # generate(name, …) leaves the active adapter alone
    # Same names, same Parameter objects: loading and switching never touched the base weights.
    assert base_parameter_ids(manager.model) == before

    manager.unload_adapter("a")
    assert manager.adapters == ["b"]


def test_a_mixed_batch_equals_each_row_run_alone(dirs):
    model, tokenizer = load_lora_model(dirs["base"])
    manager = AdapterManager.from_model(model, tokenizer)
    manager.load_adapter("a", dirs["a"])
    manager.load_adapter("b", dirs["b"])
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # prompts of different lengths
    names = ["a", None, "b", "b", "a"]
    batch = manager.generate_batch(prompts, names, max_new_tokens=NEW_TOKENS)

    alone = []
    for prompt, name in zip(prompts, names):  # reference without mixed_batch: switch, or disable for the base
        if name is None:
            with minilora.disable_adapters(model):
                alone.append(generate_text(model, tokenizer, prompt, max_new_tokens=NEW_TOKENS))
        else:
            alone.append(generate_text(manager.switch_adapter(name), tokenizer, prompt, max_new_tokens=NEW_TOKENS))
    assert batch == alone
    assert len(set(batch[:3])) == 3  # one prompt, three adapters, three different continuations


def test_a_device_budget_keeps_the_results_and_refuses_a_batch_above_it(dirs, expected):
    """device_adapters=1: one adapter on the device at a time (least recently used out), each
    generation still its adapter's own; a batch needing two at once is refused in one line."""
    model, tokenizer = load_lora_model(dirs["base"])
    manager = AdapterManager.from_model(model, tokenizer, device_adapters=1)
    manager.load_adapter("a", dirs["a"])
    manager.load_adapter("b", dirs["b"])
    for name in ("a", "b", "a"):
        assert manager.generate_batch(PROMPTS[::2], [name, name], max_new_tokens=NEW_TOKENS) == expected[name]
        assert manager.bank.resident == [name]
    with pytest.raises(minilora.BankFullError, match="2 distinct adapters needs as many slots, and this bank has 1"):
        manager.generate_batch(PROMPTS[:2], ["a", "b"], max_new_tokens=NEW_TOKENS)
    with pytest.raises(ValueError, match="device_adapters=0"):
        AdapterManager.from_model(model, tokenizer, device_adapters=0)


def test_unknown_adapter_names_list_the_loaded_ones(dirs):
    model, tokenizer = load_lora_model(dirs["base"])
    manager = AdapterManager.from_model(model, tokenizer)
    manager.load_adapter("cardiology", dirs["a"])
    manager.load_adapter("oncology", dirs["b"])
    for call in (lambda: manager.switch_adapter("neurology"), lambda: manager.unload_adapter("neurology"),
                 lambda: manager.generate("neurology", "Hello"),
                 lambda: manager.generate_batch(["Hello", "Hello"], ["cardiology", "neurology"])):
        with pytest.raises(ValueError, match="'neurology'.*loaded: cardiology, oncology"):
            call()
    with pytest.raises(ValueError, match="already loaded"):
        manager.load_adapter("oncology", dirs["b"])


# -- minilora-generate ----------------------------------------------------------------------------

def test_cli_prints_the_generation(dirs, expected, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"{PROMPTS[2]}\n\n")
    assert main(["--base_model", dirs["base"], "--adapter", dirs["a"], "--prompt", PROMPTS[0],
                 "--prompt_file", str(prompt_file), "--max_new_tokens", str(NEW_TOKENS)]) == 0
    out = capsys.readouterr().out
    assert f"### Prompt\n{PROMPTS[0]}\n### Generated\n{expected['a'][0]}\n" in out
    assert f"### Prompt\n{PROMPTS[2]}\n### Generated\n{expected['a'][1]}\n" in out


def test_cli_runs_each_prompt_through_its_own_adapter_in_one_batch(dirs, expected, capsys):
    calls = []
    original = AdapterManager.generate_batch
    AdapterManager.generate_batch = lambda self, *a, **k: calls.append(a[1]) or original(self, *a, **k)
    try:
        assert main(["--base_model", dirs["base"], "--adapters", f"cardiology={dirs['a']}", f"oncology={dirs['b']}",
                     "--prompt_for", "oncology", PROMPTS[0], "--prompt_for", "base", PROMPTS[2],
                     "--prompt_for", "cardiology", PROMPTS[2], "--max_new_tokens", str(NEW_TOKENS)]) == 0
    finally:
        AdapterManager.generate_batch = original
    assert calls == [["oncology", None, "cardiology"]]  # one call: one batch
    out = capsys.readouterr().out
    for name, prompt, text in (("oncology", PROMPTS[0], expected["b"][0]), ("base", PROMPTS[2], expected["base"][1]),
                               ("cardiology", PROMPTS[2], expected["a"][1])):
        assert f"### Prompt ({name})\n{prompt}\n### Generated\n{text}\n" in out


def test_cli_refuses_sampling_options_without_do_sample(dirs, capsys):
    with pytest.raises(SystemExit):
        main(["--base_model", dirs["base"], "--prompt", "Hello", "--temperature", "0.7"])
    assert "--do_sample" in capsys.readouterr().err


# -- minilora-generate: every bad input is one line and exit 2 (issue 18) --------------------------

@pytest.mark.parametrize("flags, words", [
    (["--prompt", "Hello", "--torch_dtype", "float99"], "torch_dtype='float99' is not a torch dtype"),
    (["--prompt", "Hello", "--adapter", "{other}"], "does not fit this model"),
    (["--prompt", "Hello", "--adapter", "{nan}", "--merge"], "non-finite value(s)"),
    (["--prompt", "Hello", "--base_model", "{tmp}/no-such-model"], "no-such-model"),
    # issue 30 (case 15): a modules_to_save entry that backtracks exponentially hung the load for good
    (["--prompt", "Hello", "--adapter", "{hostile}"], "modules_to_save entry='(a|aa)*(.*)*x' repeats a group"),
], ids=["bogus-dtype", "adapter-for-another-base", "nan-adapter-merged", "base-missing", "hanging-modules-to-save"])
def test_generate_errors_are_one_line_and_exit_2(dirs, flags, words, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-adapter"
    minilora.save_adapter(minilora.inject(tiny_llama(hidden_size=32, intermediate_size=64), r=2), other)
    nan = tmp_path / "nan-adapter"
    os.makedirs(nan)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(dirs["a"], name), "rb") as src, open(nan / name, "wb") as dst:
            dst.write(src.read())
    state = load_file(nan / "adapter_model.safetensors")
    next(v for k, v in state.items() if "lora_B" in k)[0, 0] = float("nan")
    save_file(state, nan / "adapter_model.safetensors")
    hostile = tmp_path / "hostile-adapter"
    shutil.copytree(dirs["a"], hostile)
    config = json.loads((hostile / "adapter_config.json").read_text())
    (hostile / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["(a|aa)*(.*)*x"]}))
    flags = [f.replace("{other}", str(other)).replace("{nan}", str(nan)).replace("{tmp}", str(tmp_path))
             .replace("{hostile}", str(hostile)) for f in flags]
    assert main(["--base_model", dirs["base"], *flags]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("minilora-generate")]  # not progress bars
    assert len(lines) == 1 and lines[0].startswith("minilora-generate: error: ") and words in lines[0], captured.err
    assert "Traceback" not in captured.err and "### Generated" not in captured.out


@pytest.mark.parametrize("flags, words", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "Hello", "--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0"),
    (["--prompt", "Hello", "--max_new_tokens", "-3"], "--max_new_tokens must be at least 1, got -3"),
    (["--prompt_file", "{tmp}/absent.txt"], "absent.txt: no such file"),
    (["--adapters", "{tmp}/a", "--prompt_for", "a", "Hi"], "give each adapter as NAME=PATH"),
    (["--adapters", "a={tmp}/a", "--prompt", "Hi"], "give each prompt with the adapter it runs through"),
    (["--adapters", "a={tmp}/a", "--prompt_for", "b", "Hi"], "--prompt_for b: no such adapter; --adapters names a"),
    (["--adapters", "a={tmp}/a", "--merge", "--prompt_for", "a", "Hi"], "leave out --adapter and --merge"),
    (["--prompt_for", "a", "Hi"], "--prompt_for names one of several adapters"),
], ids=["empty-prompt", "zero-new-tokens", "negative-new-tokens", "prompt-file-missing", "adapters-without-names",
        "adapters-with-a-bare-prompt", "prompt-for-an-unknown-adapter", "adapters-merged", "prompt-for-alone"])
def test_generate_refuses_bad_arguments_before_loading_a_model(flags, words, tmp_path, capsys):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["--base_model", str(tmp_path / "never-loaded"), *flags])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err
