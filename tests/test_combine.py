"""add_weighted_adapter (minilora/combine.py): the same combined adapter as PEFT's
``add_weighted_adapter`` for linear, cat and svd (same inputs and weights -> the same delta weights
and logits), saved and loaded like any adapter in both directions, and refused cleanly on bad input."""

import json

import pytest
import torch

import minilora
from conftest import assert_close_to_rounding, tiny_llama

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
# Specialty adapters with different targets, alphas (so scalings differ) and ranks.
SPECIALTIES = {
    "cardiology": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "oncology": dict(r=4, lora_alpha=16, target_modules=["v_proj", "down_proj"]),
    "neurology": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def specialty_dirs(tmp_path_factory):
    """Each specialty adapter trained (randomised) in PEFT and saved in its own folder."""
    import peft

    dirs = {}
    for i, (name, fields) in enumerate(SPECIALTIES.items()):
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", **fields))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    return dirs


def both_models(specialty_dirs, names):
    import peft

    theirs = peft.PeftModel.from_pretrained(tiny_llama(), specialty_dirs[names[0]], adapter_name=names[0])
    ours = minilora.load_adapter(tiny_llama(), specialty_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(specialty_dirs[name], adapter_name=name)
        minilora.load_adapter(ours, specialty_dirs[name], adapter_name=name)
    minilora.set_adapter(ours, names[0])  # load_adapter activates what it loads; PEFT's does not
    return theirs.eval(), ours


def their_deltas(model, name):
    return {n.removeprefix("base_model.model."): m.get_delta_weight(name) for n, m in model.named_modules()
            if hasattr(m, "lora_A") and name in getattr(m, "lora_A", {})}


def our_deltas(model, name):
    return {n: m.adapters[name].delta_weight() for n, m in minilora.lora_modules(model) if name in m.adapters}


CASES = {
    "linear": (["cardiology", "oncology"], [0.7, 0.3], dict(combination_type="linear")),
    "linear_negative": (["cardiology", "oncology"], [1.0, -0.5], dict(combination_type="linear")),
    "cat": (["cardiology", "neurology"], [0.7, 0.3], dict(combination_type="cat")),
    "svd_rank": (["oncology", "neurology"], [0.6, 0.4], dict(combination_type="svd", svd_rank=6)),
    "svd_clamp_three": (["cardiology", "oncology", "neurology"], [0.5, 0.3, 0.2],
                        dict(combination_type="svd", svd_clamp=0.9)),
    "one_adapter_svd_is_linear": (["neurology"], [0.8], dict(combination_type="svd", svd_rank=2)),
    "ties_frequency": (["cardiology", "oncology"], [0.7, -0.3],
                       dict(combination_type="ties", density=0.5, majority_sign_method="frequency")),
    "ties_svd": (["cardiology", "oncology", "neurology"], [0.5, 0.3, 0.2],
                 dict(combination_type="ties_svd", density=0.4, svd_rank=4)),
    "magnitude_prune": (["cardiology", "oncology"], [0.7, 0.3], dict(combination_type="magnitude_prune", density=0.3)),
    "magnitude_prune_svd": (["oncology", "neurology"], [0.6, 0.4],
                            dict(combination_type="magnitude_prune_svd", density=0.7)),
}


@pytest.mark.parametrize("case", CASES)
def test_combined_adapter_equals_peft_and_loads_both_ways(tmp_path, specialty_dirs, case):
    import peft

    names, weights, options = CASES[case]
    theirs, ours = both_models(specialty_dirs, names)
    theirs.add_weighted_adapter(names, weights, "combined", **options)
    minilora.add_weighted_adapter(ours, names, weights, "combined", **options)
    # Same inputs, same arithmetic: the same delta weight in every layer, to float32 rounding.
    expected, actual = their_deltas(theirs, "combined"), our_deltas(ours, "combined")
    assert set(actual) == set(expected)
    for name, delta in expected.items():
        assert_close_to_rounding(actual[name], delta, reduction=16)
    # Inactive and frozen until selected, as in PEFT; then the same logits.
    assert minilora.active_adapter(ours) == names[0]
    assert not any(p.requires_grad for _, p in minilora.lora_parameters(ours, "combined"))
    theirs.set_adapter("combined")
    minilora.set_adapter(ours, "combined")
    logits = theirs(IDS).logits
    assert not torch.allclose(logits, tiny_llama()(IDS).logits, atol=1e-3)
    assert_close_to_rounding(ours(IDS).logits, logits, reduction=128 * 16)
    # Saves and loads like any adapter, in both directions.
    minilora.save_adapter(ours, tmp_path / "ours", adapter_name="combined")
    theirs.save_pretrained(tmp_path / "peft", selected_adapters=["combined"])
    peft_dir = tmp_path / "peft" / "combined"
    assert_close_to_rounding(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()(IDS).logits,
                             logits, reduction=128 * 16)
    assert_close_to_rounding(minilora.load_adapter(tiny_llama(), peft_dir)(IDS).logits, logits, reduction=128 * 16)
    mine, peft_config = (json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path / "ours", peft_dir))
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert mine[key] == peft_config[key], key
    assert sorted(mine["target_modules"]) == sorted(peft_config["target_modules"])


def test_cat_is_the_exact_weighted_sum_of_the_deltas(specialty_dirs):
    _, ours = both_models(specialty_dirs, ["cardiology", "oncology", "neurology"])
    weights = {"cardiology": 0.5, "oncology": -0.25, "neurology": 1.5}
    minilora.add_weighted_adapter(ours, list(weights), list(weights.values()), "cat", combination_type="cat")
    parts = {name: our_deltas(ours, name) for name in weights}
    for layer, delta in our_deltas(ours, "cat").items():
        expected = sum(w * parts[name][layer] for name, w in weights.items() if layer in parts[name])
        assert_close_to_rounding(delta, expected, reduction=16)


def test_svd_at_full_rank_reproduces_the_weighted_sum_and_lower_ranks_are_the_best_approximation(specialty_dirs):
    _, ours = both_models(specialty_dirs, ["cardiology", "neurology"])
    minilora.add_weighted_adapter(ours, ["cardiology", "neurology"], [0.5, 0.5], "full", svd_rank=12)
    minilora.add_weighted_adapter(ours, ["cardiology", "neurology"], [0.5, 0.5], "low", svd_rank=2)
    layer = "model.layers.0.self_attn.q_proj"
    target = 0.5 * our_deltas(ours, "cardiology")[layer] + 0.5 * our_deltas(ours, "neurology")[layer]
    assert_close_to_rounding(our_deltas(ours, "full")[layer], target, reduction=64)
    S = torch.linalg.svdvals(target)  # Eckart–Young: the rank-2 error is the norm of the other singular values
    error = torch.linalg.matrix_norm(our_deltas(ours, "low")[layer] - target)
    assert torch.isclose(error, S[2:].norm(), rtol=1e-4)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "ties", "magnitude_prune"])
def test_sparsifying_merges_equal_pefts_merge_utils_on_the_same_tensors_and_seed(method):
    """DARE draws its masks from torch's generator, and PEFT draws for the new adapter's
    initialisation in between, so the whole-model results differ by the draws; on the same tensors
    from the same generator state, the merge is PEFT's exactly."""
    from peft.utils import merge_utils

    from minilora.combine import _weighted_sum

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(16, 24, generator=g) for _ in range(3)]
    weights = torch.tensor([0.5, -0.3, 0.8])
    reference = getattr(merge_utils, method)
    for density in (0.3, 0.9):
        torch.manual_seed(5)
        expected = reference(tensors, weights, density) if "ties" not in method else \
            reference(tensors, weights, density, "frequency")
        torch.manual_seed(5)
        actual = _weighted_sum(tensors, weights, method, density, "frequency")
        assert torch.equal(actual, expected)
    kept = (_weighted_sum(tensors[:1], torch.ones(1), method, 0.3, "total") != 0).float().mean()
    assert abs(kept - 0.3) < 0.1  # the density is the fraction kept


def test_rslora_adapters_combine_to_their_weighted_sum():
    """The combined weights already hold each adapter's alpha/√r; the new adapter is written with
    use_rslora off so that it is scaled by 1, not √r (where PEFT 0.21 keeps use_rslora)."""
    model = minilora.inject(tiny_llama(), r=4, alpha=8, use_rslora=True, target_modules=["q_proj"], adapter_name="a")
    minilora.inject(model, r=4, alpha=4, use_rslora=True, target_modules=["q_proj"], adapter_name="b")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in minilora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    minilora.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab", combination_type="cat")
    layer = "model.layers.1.self_attn.q_proj"
    expected = 0.5 * our_deltas(model, "a")[layer] + 0.5 * our_deltas(model, "b")[layer]
    assert_close_to_rounding(our_deltas(model, "ab")[layer], expected, reduction=16)
    assert minilora.peft_config(model, "ab")["use_rslora"] is False


def test_adapters_on_different_layers_keep_every_layer(tmp_path):
    """PEFT copies the first adapter's layers_to_transform, which would drop the second adapter's
    layers; the combined adapter here names exactly the layers that hold a source adapter."""
    import peft

    model = minilora.inject(tiny_llama(), r=4, target_modules=["q_proj"], layers_to_transform=[0], adapter_name="a")
    minilora.inject(model, r=4, target_modules=["q_proj"], layers_to_transform=[1], adapter_name="b")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in minilora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    minilora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    assert set(our_deltas(model, "ab")) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    minilora.set_adapter(model, "ab")
    minilora.save_adapter(model, tmp_path, adapter_name="ab")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_close_to_rounding(theirs(IDS).logits, model(IDS).logits, reduction=128 * 16)


@pytest.mark.parametrize("names, weights, options, words", [
    (["cardiology", "oncology"], [1.0, 1.0], dict(adapter_name="cardiology"), "already has an adapter named"),
    (["cardiology", "nephrology"], [1.0, 1.0], {}, "unknown adapter 'nephrology'"),
    (["cardiology", "oncology"], [1.0], {}, "2 adapters but 1 weights"),
    (["cardiology", "oncology"], [1.0, float("nan")], {}, "not a finite number"),
    ([], [], {}, "adapters is empty"),
    (["cardiology", "neurology"], [1.0, 1.0], dict(combination_type="linear"), "one rank, got r=\\[4, 8\\]"),
    (["cardiology", "oncology"], [1.0, 1.0], dict(combination_type="mean"), "'mean'; use one of svd, linear, cat"),
    (["cardiology", "oncology"], [1.0, 1.0], dict(combination_type="ties"), "density in \\(0, 1\\]"),
    (["cardiology", "oncology"], [1.0, 1.0], dict(combination_type="dare_linear", density=0), "not 0"),
    (["cardiology", "oncology"], [1.0, 1.0], dict(combination_type="ties", density=0.5, majority_sign_method="vote"),
     "majority_sign_method='vote'"),
    (["cardiology", "oncology"], [1.0, 1.0], dict(svd_rank=65), "exceeds the rank 64"),
    (["cardiology", "oncology"], [1.0, 1.0], dict(svd_rank=0), "svd_rank=0"),
    (["cardiology", "oncology"], [1.0, 1.0], dict(svd_clamp=2), "svd_clamp=2"),
    # issue 30: the name checked up front, as inject checks it; a combination that overflows float32
    (["cardiology", "oncology"], [1.0, 1.0], dict(adapter_name="forward"), "nn.ModuleDict"),
    (["cardiology", "oncology"], [1.0, 1.0], dict(adapter_name="../up"), "a plain name"),
    (["cardiology", "neurology"], [1e39, 0.5], dict(combination_type="cat"), "overflow float32 .* in model"),
    (["cardiology", "oncology"], [1e41, 0.5], dict(combination_type="linear"), "overflow float32"),  # in B·A only
    (["cardiology", "oncology"], [1e39, 0.5], dict(combination_type="svd"), "overflow float32"),
])
def test_bad_arguments_raise_and_leave_the_model_as_it_was(specialty_dirs, names, weights, options, words):
    _, ours = both_models(specialty_dirs, ["cardiology", "oncology", "neurology"])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    options = {"adapter_name": "combined", **options}
    with pytest.raises(ValueError, match=words):
        minilora.add_weighted_adapter(ours, names, weights, **options)
    assert set(minilora.adapter_names(ours)) == {"cardiology", "oncology", "neurology"}
    assert minilora.active_adapter(ours) == "cardiology"
    after = ours.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_dora_and_merged_adapters_are_refused():
    model = minilora.inject(tiny_llama(), r=4, target_modules=["q_proj"], adapter_name="plain")
    minilora.inject(model, r=4, target_modules=["q_proj"], use_dora=True, adapter_name="dora")
    with pytest.raises(ValueError, match="'dora' is a DoRA adapter"):
        minilora.add_weighted_adapter(model, ["plain", "dora"], [1.0, 1.0], "both")
    minilora.set_adapter(model, "plain")
    minilora.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        minilora.add_weighted_adapter(model, ["plain"], [1.0], "again")
    assert minilora.adapter_names(model) == ["plain", "dora"]


def test_adapters_with_modules_to_save_are_refused():
    model = minilora.inject(tiny_llama(), r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                            adapter_name="a")
    minilora.inject(model, r=4, target_modules=["q_proj"], adapter_name="b")
    with pytest.raises(ValueError, match="'a' has modules_to_save"):
        minilora.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab", combination_type="cat")
    assert set(minilora.adapter_names(model)) == {"a", "b"}


def test_regex_targets_whose_union_exceeds_the_pattern_limit_still_combine():
    """Each regex is within the 1,000-character limit, their union is not: the new adapter names the
    layers instead (the union raised the limit's ValueError)."""
    never = "|".join(f"never_{i:03d}" for i in range(85))
    model = minilora.inject(tiny_llama(), r=4, target_modules=rf"model\.layers\.0\.self_attn\.q_proj|{never}",
                            adapter_name="a")
    minilora.inject(model, r=4, target_modules=rf"model\.layers\.0\.self_attn\.v_proj|{never}", adapter_name="b")
    minilora.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab", combination_type="cat")
    assert {n for n, m in minilora.lora_modules(model) if "ab" in m.adapters} == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
