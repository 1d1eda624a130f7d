"""What vLLM's LoRA loader accepts, applied to the folders minilora writes: the README's claim that
vLLM loads minilora's adapters holds for the adapters described there, and the features vLLM
refuses are named in the docs.

vllm_problems() restates vLLM's checks (vLLM is not installable here: it needs a GPU build), read
from vllm-project/vllm: lora/peft_helper.py (PEFTHelper.from_dict: r, lora_alpha and
target_modules are required; _validate_features: modules_to_save must be empty, no DoRA;
validate_legal: r <= --max-lora-rank, bias must be "none"), lora/lora_model.py
(from_local_checkpoint reads adapter_model.safetensors; check_unexpected_modules: every key's
module must end in a supported module name; an embedding's lora_embedding_A must have the
model's vocabulary size) and lora/utils.py (parse_fine_tuned_lora_name: a key is
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` or ``<module>.lora_embedding_A`` /
``_B``, anything else is "unsupported LoRA weight"; is_base_embedding_weights skips
``.embed_tokens.base_layer.weight`` and ``.lm_head.base_layer.weight``).
"""

import json

import pytest
from safetensors import safe_open

import minilora
from conftest import tiny_llama

# vLLM's Llama: its Linear layers' names (packed qkv_proj / gate_up_proj list their parts) plus
# embedding_modules {"embed_tokens", "lm_head"}.
VLLM_LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "qkv_proj", "gate_up_proj", "embed_tokens", "lm_head"}
VLLM_DEFAULT_MAX_LORA_RANK = 16


def vllm_problems(folder, vocab_size: int, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> list[str]:
    """The reasons vLLM would refuse the adapter in ``folder`` ([] if it loads)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    problems = [f"missing {k}" for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if config.get("modules_to_save"):
        problems.append("modules_to_save")
    if config.get("use_dora"):
        problems.append("DoRA")
    if config.get("r", 0) <= 0 or config.get("r", 0) > max_lora_rank:
        problems.append(f"r={config.get('r')} > max_lora_rank")
    if config.get("bias", "none") != "none":
        problems.append("bias")
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
        for key in f.keys():
            if key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
                continue  # the base embedding PEFT writes: vLLM skips it
            parts = key.removeprefix("base_model.model.").split(".")
            if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
                module = parts[:-2]
            elif parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
                module = parts[:-1]
                if parts[-1] == "lora_embedding_A" and f.get_slice(key).get_shape()[1] != vocab_size:
                    problems.append(f"{key}: vocabulary size")
            else:
                problems.append(f"unsupported LoRA weight {key}")
                continue
            if module[-1] not in VLLM_LLAMA_MODULES:
                problems.append(f"unexpected module {'.'.join(module)}")
            if parts[-1] == "weight" and parts[-2] == "lora_A" and f.get_slice(key).get_shape()[0] > max_lora_rank:
                problems.append(f"{key}: rank above max_lora_rank")
    return problems


def saved(tmp_path, **fields):
    model = minilora.inject(tiny_llama(attention_bias=fields.pop("attention_bias", False)), **fields)
    minilora.save_adapter(model, tmp_path)
    return tmp_path


@pytest.mark.parametrize("fields", [
    dict(r=16),                                                      # the README's adapter: seven projections
    dict(r=8, alpha=16, target_modules="all-linear", use_rslora=True),
    dict(r=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),  # LoRA on the input embeddings
    dict(r=8, rank_pattern={"v_proj": 4}),
], ids=["readme", "all_linear_rslora", "embedding", "rank_pattern"])
def test_adapters_the_readme_describes_pass_vllms_loader_checks(tmp_path, fields):
    assert vllm_problems(saved(tmp_path, **fields), vocab_size=128) == []


@pytest.mark.parametrize("fields, problem", [
    (dict(r=8, modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(r=8, bias="all", attention_bias=True), "bias"),
    (dict(r=32), "max_lora_rank"),
], ids=["modules_to_save", "bias", "rank_32"])
def test_what_the_docs_say_vllm_refuses_it_refuses(tmp_path, fields, problem):
    problems = vllm_problems(saved(tmp_path, **fields), vocab_size=128)
    assert any(problem in p for p in problems), problems


def test_a_rank_above_vllms_default_loads_with_a_raised_max_lora_rank(tmp_path):
    assert vllm_problems(saved(tmp_path, r=32), vocab_size=128, max_lora_rank=32) == []
