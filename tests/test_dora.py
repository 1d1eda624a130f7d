"""DoRA (minilora/dora.py): the same outputs, gradients, merged weights and files as PEFT's
``use_dora=True``, on a tiny Llama whose adapted projections have biases."""

import json

import pytest
import torch
from safetensors.torch import load_file

import minilora
from conftest import assert_close_to_rounding, randomize_adapters, run_xla, tiny_llama, trained
from minilora import AdapterLoadError

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
BASE = dict(attention_bias=True)  # q/k/v/o biases: DoRA must leave the bias out of the rescaling
TARGETS = ["q_proj", "v_proj", "down_proj"]
OURS = dict(r=4, alpha=8, target_modules=TARGETS, use_dora=True)
THEIRS = dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)


def assert_equal_within(actual, expected, rel=1e-5):
    """|actual - expected| <= rel · max|expected|: the issue's bound for fp32 logits against PEFT."""
    assert (actual - expected).abs().max().item() <= rel * expected.abs().max().item()


def peft_dora(dropout=0.0, seed=3):
    """A PEFT DoRA model whose every trainable tensor (A, B, magnitude) has moved, as training moves them."""
    import peft

    return trained(peft.get_peft_model(tiny_llama(**BASE), peft.LoraConfig(lora_dropout=dropout, **THEIRS)), seed)


def ours_dora(dropout=0.0):
    model = randomize_adapters(minilora.inject(tiny_llama(**BASE), dropout=dropout, **OURS))
    with torch.no_grad():  # the magnitude moves too (randomize_adapters would overwrite it with noise)
        for _, layer in minilora.lora_modules(model):
            layer.adapters["default"].lora_magnitude_vector.mul_(1.1)
    return model


def test_a_new_dora_adapter_changes_nothing_and_its_magnitude_is_the_row_norm_of_w0():
    base = tiny_llama(**BASE)
    expected = base(IDS).logits
    model = minilora.inject(base, **OURS)
    layer = model.model.layers[0].self_attn.q_proj
    magnitude = layer.adapters["default"].lora_magnitude_vector
    assert magnitude.shape == (layer.out_features,) and magnitude.requires_grad
    assert torch.equal(magnitude, torch.linalg.vector_norm(layer.weight, dim=1))
    assert_close_to_rounding(model(IDS).logits, expected, reduction=64)


def test_peft_dora_adapter_loads_with_the_same_logits(tmp_path):
    theirs = peft_dora().eval()
    theirs.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    ours = minilora.load_adapter(tiny_llama(**BASE), tmp_path)
    expected = theirs(IDS).logits
    assert not torch.allclose(expected, tiny_llama(**BASE)(IDS).logits, atol=1e-3)  # the adapter matters
    assert_equal_within(ours(IDS).logits, expected)


def test_minilora_dora_adapter_loads_in_peft_with_the_same_logits_and_the_same_files(tmp_path):
    import peft

    ours = ours_dora()
    minilora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(**BASE), tmp_path / "ours").eval()
    assert_equal_within(theirs(IDS).logits, ours(IDS).logits)
    # PEFT writes the same key set, shapes and use_dora for the same config
    peft.get_peft_model(tiny_llama(**BASE), peft.LoraConfig(**THEIRS)).save_pretrained(tmp_path / "peft")
    mine, peft_keys = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in peft_keys.items()}
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_step_matches_peft_outputs_and_gradients(tmp_path, dropout):
    """Same weights, same dropout draws: the same loss and the same gradients for A, B and the
    magnitude. A norm that was not detached, or dropout applied to the base term differently,
    would change the gradients by far more than rounding."""
    theirs = peft_dora(dropout).train()
    theirs.save_pretrained(tmp_path)
    for module in theirs.modules():  # PEFT's nn.Dropout draws other masks: give it minilora's, seeded alike
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict) and dropout:
            module.lora_dropout["default"] = minilora.dropout.LoRADropout(dropout).train()
    ours = minilora.load_adapter(tiny_llama(**BASE), tmp_path, is_trainable=True).train()
    losses = []
    for model in (theirs, ours):
        torch.manual_seed(7)
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss)
    assert_equal_within(losses[1], losses[0])
    their_grads = {n.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", ""): p.grad
                   for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n.replace(".adapters.default", ""): p.grad for n, p in minilora.lora_parameters(ours)}
    assert set(our_grads) == set(their_grads) and len(our_grads) == 3 * 2 * 3
    for name, grad in our_grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert_equal_within(grad, their_grads[name], rel=1e-4)


def test_merge_matches_peft_merged_weights_and_unmerge_restores_the_base(tmp_path):
    import peft

    ours = ours_dora()
    minilora.save_adapter(ours, tmp_path)
    expected = ours(IDS).logits
    base_weight = ours.model.layers[1].mlp.down_proj.weight.detach().clone()
    minilora.merge(ours)
    minilora.merge(ours)  # idempotent
    assert_close_to_rounding(ours(IDS).logits, expected, reduction=128 * 4)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(**BASE), tmp_path).merge_and_unload()
    for name, layer in minilora.lora_modules(ours):
        their_weight = theirs.get_submodule(name).weight
        assert_close_to_rounding(layer.weight, their_weight, reduction=layer.in_features)
    minilora.unmerge(ours)
    assert_close_to_rounding(ours.model.layers[1].mlp.down_proj.weight, base_weight, reduction=128)
    assert_close_to_rounding(ours(IDS).logits, expected, reduction=128 * 4)
    plain = minilora.merge_and_unload(ours)
    assert not list(minilora.lora_modules(plain))
    assert_close_to_rounding(plain(IDS).logits, expected, reduction=128 * 4)


def test_dropout_draws_from_the_same_op_as_lora_s_one_mask_per_adapted_linear():
    from test_layer import OpRecorder

    model = ours_dora(dropout=0.1).train()
    with OpRecorder() as recorder:
        model(IDS, labels=IDS).loss.backward()
    random_ops = [n for n, _ in recorder.ops if any(w in n for w in ("dropout", "bernoulli", "rand"))]
    assert random_ops == ["minilora.dropout_mask.default"] * len(list(minilora.lora_modules(model)))


def test_dropout_is_off_in_eval_and_the_magnitude_trains():
    model = ours_dora(dropout=0.5).eval()
    assert torch.equal(model(IDS).logits, model(IDS).logits)
    model.train()
    magnitude = model.model.layers[0].self_attn.q_proj.adapters["default"].lora_magnitude_vector
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 3 * 2 * 3 and any(n.endswith("lora_magnitude_vector") for n in names)
    model(IDS, labels=IDS).loss.backward()
    assert magnitude.grad is not None and magnitude.grad.abs().max() > 0


def test_dora_refuses_mixed_batches_in_training_and_bad_settings(tmp_path):
    model = ours_dora().train()  # in eval mode a mixed batch serves DoRA stacked (tests/test_batched.py)
    with pytest.raises(ValueError, match="DoRA adapter"):
        minilora.mixed_batch(model, ["default", None])
    model.eval()
    with pytest.raises(ValueError, match="use_dora='yes'"):
        minilora.LoRAConfig(use_dora="yes")
    minilora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": "yes"}))
    fresh = tiny_llama(**BASE)
    with pytest.raises(AdapterLoadError, match="use_dora"):
        minilora.load_adapter(fresh, tmp_path)
    assert not list(minilora.lora_modules(fresh))


def test_a_plain_lora_file_without_magnitudes_does_not_load_as_dora(tmp_path):
    """A use_dora config whose file lacks the magnitudes is refused by name, not run with ||W0||."""
    plain = randomize_adapters(minilora.inject(tiny_llama(**BASE), r=4, alpha=8, target_modules=TARGETS))
    minilora.save_adapter(plain, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterLoadError, match="missing from file: .*lora_magnitude_vector"):
        minilora.load_adapter(tiny_llama(**BASE), tmp_path)


# Runs in a fresh interpreter with PJRT_DEVICE=CPU (conftest.run_xla): DoRA training steps on the
# XLA device give eager's losses and magnitude gradients, and after the first two steps (which
# compile) a step compiles nothing new: the norm, recomputed from weights that change every step,
# is a graph input like any tensor, not a constant.
XLA_DORA = """
import json, sys
import torch, torch_xla
import torch_xla.debug.metrics as met
sys.path.insert(0, "tests")
from conftest import tiny_llama
import minilora

def compiles():
    data = met.metric_data("CompileTime")
    return (data[0] if data else 0) + (met.counter_value("UncachedCompile") or 0)

ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
devices = {"xla": torch_xla.device(), "cpu": torch.device("cpu")}  # XLA's first: autograd sizes its queues then
runs = {}
for where in ("cpu", "xla"):
    device = devices[where]
    model = minilora.inject(tiny_llama(num_hidden_layers=1, attention_bias=True), r=4, dropout=0.0,
                            target_modules=["q_proj", "down_proj"], use_dora=True).to(device).train()
    optimizer = torch.optim.SGD([p for _, p in minilora.lora_parameters(model)], lr=0.5)
    magnitude = model.model.layers[0].self_attn.q_proj.adapters["default"].lora_magnitude_vector
    losses, grads, counts = [], [], []
    for _ in range(4):
        loss = model(ids.to(device), labels=ids.to(device)).loss
        loss.backward()
        grads.append(magnitude.grad.detach().clone())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if where == "xla":
            torch_xla.sync()
            counts.append(compiles())
        losses.append(loss.detach())
    runs[where] = ([l.item() for l in losses], torch.stack(grads).cpu(), counts)
(cpu_losses, cpu_grads, _), (xla_losses, xla_grads, counts) = runs["cpu"], runs["xla"]
print(json.dumps({"cpu": cpu_losses, "xla": xla_losses, "grad_diff": (cpu_grads - xla_grads).abs().max().item(),
                  "grad_scale": cpu_grads.abs().max().item(), "new_compiles": counts[3] - counts[1]}))
"""


def test_dora_trains_on_xla_as_in_eager_without_recompiling():
    result = run_xla(XLA_DORA)
    assert result["new_compiles"] == 0
    assert result["cpu"][0] != result["cpu"][-1]  # the steps do train
    for cpu, xla in zip(result["cpu"], result["xla"]):
        assert abs(cpu - xla) <= 1e-5 * abs(cpu)
    assert result["grad_diff"] <= 1e-4 * result["grad_scale"]


def test_dora_on_an_embedding_is_refused_before_anything_changes():
    model = tiny_llama(**BASE)
    with pytest.raises(ValueError, match="DoRA for Linear layers only.*embed_tokens"):
        minilora.inject(model, r=4, target_modules=["q_proj", "embed_tokens"], use_dora=True)
    assert not list(minilora.lora_modules(model))


# -- rows that m/n cannot divide by (issue 30) ------------------------------------------------------

def test_a_base_row_of_zeros_leaves_a_new_dora_adapter_exact_and_its_gradients_finite():
    """A zero row has n = 0 and, fresh, m = 0: 0/0 made the row NaN and with it every logit.
    Such a row computes 0 whatever it is scaled by."""
    base = tiny_llama(**BASE)
    with torch.no_grad():
        base.model.layers[0].mlp.down_proj.weight[3].zero_()
        base.model.layers[1].self_attn.q_proj.weight[5].zero_()
    expected = base(IDS).logits
    model = minilora.inject(base, dropout=0.1, **OURS)
    assert_close_to_rounding(model(IDS).logits, expected, reduction=64)
    minilora.merge(model, safe=True)
    assert_close_to_rounding(model(IDS).logits, expected, reduction=128 * 4)
    minilora.unmerge(model)
    model.train()  # dropout on: the other forward path
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    assert loss.isfinite()
    assert all(p.grad.isfinite().all() for _, p in minilora.lora_parameters(model))


@pytest.mark.parametrize("magnitude, dtype", [(0.0, torch.float32), (1e-6, torch.float16)],
                         ids=["zero-magnitude", "below-fp16-normal-range"])
def test_unmerge_gives_back_exactly_the_rows_that_merging_rescaled_away(magnitude, dtype):
    """m = 0 switches a feature off; merged, its row is zeros, and unmerging divided by m/n = 0
    and left the row NaN for good. A tiny m in fp16 rounds the merged row to (almost) zeros.
    merge keeps such rows of W0, and unmerge puts them back bit for bit."""
    model = ours_dora().to(dtype)
    layer = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.adapters["default"].lora_magnitude_vector[5] = magnitude
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    minilora.merge(model, safe=True)
    if magnitude == 0:
        assert torch.equal(layer.weight[5], torch.zeros_like(layer.weight[5]))  # what DoRA computes there
    minilora.unmerge(model)
    assert torch.equal(layer.weight[5], before["model.layers.1.self_attn.v_proj.weight"][5])
    for name, p in model.named_parameters():
        assert p.isfinite().all(), name
        assert_close_to_rounding(p, before[name], reduction=16)  # the other rows: a few roundings in their dtype
