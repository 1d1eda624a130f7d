"""train/gguf_export.py: adapters for llama.cpp (a GGUF LoRA, a merged GGUF), checked by llama.cpp itself.

The first tests read the written files back in Python, on tiny GGUF models. The last ones load
SmolLM2-135M-Instruct (Q4_1, the demo's base) in llama.cpp through llama-cpp-python, with the
exported adapter and as a merged file, and compare llama.cpp's next-token distributions with
minilora's over 300 positions of held-out MedQuAD text. The yardstick is llama.cpp's own fidelity:
it multiplies Q4_1 weights with 8-bit activations, so its base already differs from minilora's
float computation of the same weights; with the adapter it must agree as closely as that (mean KL
at most max(1.5 x the base's, the base's + 0.002), top-1 agreement within 2 points), while the
adapter itself moves the distributions far more than that gap.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import minilora
from minilora_train.gguf_base import load_gguf_base, read_header, rope_rows
from minilora_train.gguf_export import ExportError, export_gguf_lora, export_gguf_merged, main

from conftest import write_tiny_gguf

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # config and tokenizer caches of the files
    return tmp_path


def adapted(path, seed: int = 0, std: float = 0.1, **config):
    """The block model of ``path`` with a LoRA adapter whose A and B are seeded N(0, std) values."""
    model, tokenizer = load_gguf_base(path)
    fields = dict(r=4, alpha=8, target_modules=TARGETS)
    fields.update(config)
    minilora.inject(model, minilora.LoRAConfig(**fields))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in minilora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model, tokenizer


# per-module scales: v_proj rank 2, o_proj alpha 3, everything else alpha 8 / sqrt(4) (rsLoRA)
PATTERNS = dict(rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0}, use_rslora=True)


def test_the_lora_file_holds_what_llama_cpps_loader_reads_and_computes_the_adapters_update(cache):
    """What src/llama-adapter.cpp checks (metadata, names, shapes) and what llama-graph.cpp then adds
    to each product: lora_b (lora_a x) · alpha / r, r taken from lora_b, in the file's row order."""
    import gguf

    path = write_tiny_gguf(cache / "tiny.gguf", "Q8_0")
    model, _ = adapted(path, **PATTERNS)
    minilora.save_adapter(model, str(cache / "adapter"))
    out = export_gguf_lora(str(cache / "adapter"), path, cache / "adapter.gguf")
    reader = gguf.GGUFReader(out)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert (fields["general.type"], fields["general.architecture"], fields["adapter.type"]) == ("adapter", "llama", "lora")
    alpha = fields["adapter.lora.alpha"]
    assert alpha == 8.0
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    header = read_header(path)
    assert len(tensors) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for name, module in minilora.lora_modules(model):
        layer, kind = name.split(".")[2], name.rsplit(".", 1)[1]
        gguf_name = f"blk.{layer}." + {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                                       "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind] + ".weight"
        a, b = tensors[gguf_name + ".lora_a"], tensors[gguf_name + ".lora_b"]
        out_features, in_features = header.tensors[gguf_name].shape
        rank = module.adapters["default"].lora_A.shape[0]
        assert a.shape == (rank, in_features) and b.shape == (out_features, rank)  # the shapes the loader checks
        update = torch.from_numpy(b @ a) * (alpha / b.shape[1])  # what llama.cpp adds, in its row order
        expected = module.adapters["default"].delta_weight()
        if kind in ("q_proj", "k_proj"):  # llama.cpp's rows are in convert_hf_to_gguf.py's RoPE order
            expected = expected[rope_rows(out_features, 4 if kind == "q_proj" else 2)]
        torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting, message", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "bias"),
    (dict(target_modules=TARGETS + ["lm_head"]), "tied"),
])
def test_what_llama_cpp_cannot_load_is_refused_in_one_line_and_nothing_is_written(cache, setting, message):
    path = write_tiny_gguf(cache / "tiny.gguf", "F16")
    model = minilora.dequantize(load_gguf_base(path)[0])  # trained on the float model (DoRA, modules_to_save)
    minilora.inject(model, minilora.LoRAConfig(r=4, **{"target_modules": TARGETS, **setting}))
    minilora.save_adapter(model, str(cache / "adapter"))
    with pytest.raises(ExportError) as error:
        export_gguf_lora(str(cache / "adapter"), path, cache / "adapter.gguf")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not list(cache.glob("*adapter.gguf*"))


@pytest.mark.parametrize("outtype, ggml_type", [("f16", "Q4_K"), ("base", "Q8_0")])
def test_a_merged_file_holds_each_adapted_weight_rounded_once_to_its_type(cache, outtype, ggml_type):
    path = write_tiny_gguf(cache / "tiny.gguf", ggml_type)
    model, tokenizer = adapted(path, std=0.05, **PATTERNS)
    minilora.save_adapter(model, str(cache / "adapter"))
    merged = export_gguf_merged(str(cache / "adapter"), path, cache / "merged.gguf", outtype)
    again, _ = load_gguf_base(merged)
    assert {w.ggml_type for _, w in minilora.quant.quantized_layers(again)} == ({"F16"} if outtype == "f16" else {ggml_type})
    for name, layer in minilora.lora_modules(model):
        expected = layer.weight.dequantize() + layer.adapters["default"].delta_weight()  # (out, in) float32
        got = again.get_submodule(name).weight.dequantize()
        if outtype == "f16":  # round to nearest: half a unit in the last place of 11 bits
            assert torch.equal(got, expected.half().float())
        else:  # Q8_0: blocks of 32 in steps of 1/127 of their largest magnitude: half a step, plus up to
            # 127 x the step's own float16 rounding (2^-11 relative): 0.56 of a step at most
            step = expected.view(expected.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
            assert ((got - expected).view(step.shape[0], -1, 32).abs() <= 0.57 * step).all()
    ids = torch.randint(0, len(tokenizer), (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits.argmax(-1), model(ids).logits.argmax(-1)) or outtype == "base"
    assert read_header(merged).metadata["tokenizer.ggml.model"] == "gpt2"  # the base's metadata, kept


def test_the_command_line_writes_the_file_and_refuses_a_missing_base_in_one_line(cache, capsys):
    path = write_tiny_gguf(cache / "tiny.gguf", "Q8_0")
    model, _ = adapted(path)
    minilora.save_adapter(model, str(cache / "adapter"))
    config = json.loads((cache / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path)  # so --base may be left out
    assert main([str(cache / "adapter"), "--to", "gguf-lora", "--out", str(cache / "a.gguf")]) == 0
    assert read_header(cache / "a.gguf").metadata["general.type"] == "adapter"
    assert main([str(cache / "adapter"), "--to", "gguf-lora", "--base", str(cache / "nothing.gguf"),
                 "--out", str(cache / "b.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minilora-export: error:") and "nothing.gguf" in err and "\n" not in err


# -- llama.cpp itself, on the demo's base -------------------------------------------------------------

POSITIONS = 300  # held-out tokens whose next-token distributions are compared (at least 256 asked)


class LlamaCppCheck:
    """SmolLM2-135M-Instruct (Q4_1) with a LoRA adapter (r 8 on the seven projections of all 30
    layers, v_proj at rank 4, o_proj at alpha 8, rsLoRA: every way a module's scale can differ),
    exported to GGUF; next-token log-probabilities of minilora and of llama.cpp on the same tokens."""

    def __init__(self, folder, cache_parent):
        from minilora_train.base_model import packaged_smollm2
        from minilora_train.demo_assets import read_medquad

        self.folder, self.base, self.scores = folder, packaged_smollm2(), {}
        self.model, tokenizer = load_gguf_base(self.base)
        # held-out medical text: answers of the validation split, which no run trains on
        text = " ".join(r["answer"] for r in read_medquad("validation")[:20])
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"][:POSITIONS]
        minilora.inject(self.model, minilora.LoRAConfig(r=8, alpha=16, target_modules=TARGETS, use_rslora=True,
                                                        rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 8.0}))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # what training does, in size: every A and B moved by N(0, 0.02)
            for _, p in minilora.lora_parameters(self.model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        self.adapter = str(folder / "adapter")
        minilora.save_adapter(self.model, self.adapter)
        self.lora = export_gguf_lora(self.adapter, self.base, folder / "adapter.gguf")

    def merged(self, outtype: str):
        """The adapter merged into the base file (``outtype`` as export_gguf_merged), written once."""
        path = self.folder / f"merged-{outtype}.gguf"
        return path if path.is_file() else export_gguf_merged(self.adapter, self.base, path, outtype)

    def minilora(self, model, adapter: bool = True) -> torch.Tensor:
        with torch.no_grad():
            if adapter:
                return torch.log_softmax(model(torch.tensor([self.ids])).logits[0].float(), -1)
            with minilora.disable_adapters(model):
                return torch.log_softmax(model(torch.tensor([self.ids])).logits[0].float(), -1)

    def llama_cpp(self, model_path, lora_path=None) -> torch.Tensor:
        """llama.cpp's next-token log-probabilities (positions, vocab), computed once per file pair."""
        from llama_cpp import Llama

        key = (str(model_path), str(lora_path))
        if key in self.scores:
            return self.scores[key]
        llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=512,
                    n_batch=512, n_ubatch=512, logits_all=True, n_threads=torch.get_num_threads(), verbose=False)
        llm.eval(self.ids)
        scores = torch.from_numpy(np.array(llm.scores[:len(self.ids)], dtype=np.float32))
        llm.close()
        self.scores[key] = torch.log_softmax(scores, -1)
        return self.scores[key]


def gap(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference ‖ other) in nats, top-1 agreement in %) over positions (N, vocab) log-probs."""
    kl = (reference.exp() * (reference - other)).sum(-1).mean().item()
    return kl, 100 * int((reference.argmax(-1) == other.argmax(-1)).sum()) / reference.shape[0]


def assert_as_close_as_the_base(with_adapter, base, effect):
    """The issue's yardstick: mean KL at most max(1.5 x the base's, the base's + 0.002), top-1 within
    2 points of the base's; and the adapter's own effect far above that bound, so a wrong export
    (a dropped permutation, a wrong scale) cannot pass."""
    bound = max(1.5 * base[0], base[0] + 0.002)
    print(f"base gap KL {base[0]:.5f} top-1 {base[1]:.2f}%; with the adapter KL {with_adapter[0]:.5f} top-1 "
          f"{with_adapter[1]:.2f}%; the adapter's own effect KL {effect[0]:.5f} top-1 {effect[1]:.2f}%")
    assert with_adapter[0] <= bound
    assert with_adapter[1] >= base[1] - 2
    assert effect[0] >= 5 * bound
    return bound


@pytest.fixture(scope="module")
def llama_cpp_check(tmp_path_factory, smollm2):
    cache, _, _ = smollm2
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache.parent))  # the session's conversion gives config and tokenizer
        check = LlamaCppCheck(tmp_path_factory.mktemp("llama-cpp"), cache.parent)
        check.adapted, check.base_probs = check.minilora(check.model), check.minilora(check.model, adapter=False)
        check.base_gap = gap(check.base_probs, check.llama_cpp(check.base))
        check.effect = gap(check.adapted, check.base_probs)
        yield check


def test_llama_cpp_runs_the_exported_adapter_on_the_q4_1_base_as_closely_as_the_base(llama_cpp_check):
    check = llama_cpp_check
    assert len(check.ids) >= 256
    assert_as_close_as_the_base(gap(check.adapted, check.llama_cpp(check.base, check.lora)), check.base_gap, check.effect)


def test_an_export_without_the_rope_permutation_fails_that_yardstick(llama_cpp_check, monkeypatch):
    """The yardstick can tell: the same export with lora_B of q and k left in transformers' row order."""
    import minilora_train.gguf_export as export

    check = llama_cpp_check
    monkeypatch.setenv("XDG_CACHE_HOME", str(check.folder.parent))
    monkeypatch.setattr(export, "permutation_for", lambda header, name: None)
    wrong = export.export_gguf_lora(check.adapter, check.base, check.folder / "unpermuted.gguf")
    kl, _ = gap(check.adapted, check.llama_cpp(check.base, wrong))
    assert kl > 2 * max(1.5 * check.base_gap[0], check.base_gap[0] + 0.002)


def test_llama_cpp_runs_the_merged_f16_file_alone_as_the_adapted_model(llama_cpp_check):
    check = llama_cpp_check
    assert_as_close_as_the_base(gap(check.adapted, check.llama_cpp(check.merged("f16"))), check.base_gap, check.effect)


def test_on_an_f16_base_llama_cpp_and_minilora_agree_almost_exactly(llama_cpp_check):
    """SmolLM2's Q4_1 weights written as F16 (their float16 rounding is the only change) leave next
    to no gap: llama.cpp multiplies F16 weights in F16 and the adapter in F32. The same adapter
    file loads on it."""
    check = llama_cpp_check
    f16 = export_gguf_merged(None, check.base, check.folder / "f16.gguf", "f16")
    base_gap = gap(check.base_probs, check.llama_cpp(f16))
    assert base_gap[0] < 1e-3 and base_gap[1] >= 99
    assert_as_close_as_the_base(gap(check.adapted, check.llama_cpp(f16, check.lora)), base_gap, check.effect)


def test_a_merge_re_quantized_to_q4_1_strays_further_than_the_f16_merge(llama_cpp_check):
    """Rounding W + ΔW to Q4_1's grid again adds a second rounding of 4-bit size to every adapted
    weight: the file runs, but the F16 merge (or the LoRA file) is the faithful one (docs/gguf.md)."""
    check = llama_cpp_check
    q4_1 = gap(check.adapted, check.llama_cpp(check.merged("base")))
    f16 = gap(check.adapted, check.llama_cpp(check.merged("f16")))
    print(f"merged Q4_1: KL {q4_1[0]:.5f} top-1 {q4_1[1]:.2f}%; merged F16: KL {f16[0]:.5f} top-1 {f16[1]:.2f}%; "
          f"the adapter's own effect KL {check.effect[0]:.5f}")
    assert q4_1[0] > f16[0]
