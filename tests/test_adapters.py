"""Named adapters on one model: switching, disabling, deleting, mixed batches, and that switching
between adapters of the same shapes reuses a compiled XLA graph (no recompilation)."""

import pytest
import torch

import minilora
from conftest import randomize_adapters, run_xla, tiny_llama
from test_checkpoint import IDS, trained


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """A model holding adapters "a" (q, v; r=4) and "b" (all seven; r=8), loaded from the files of
    two single-adapter models, plus each single model's logits: what each adapter must reproduce."""
    path = tmp_path_factory.mktemp("adapters")
    expected = {}
    for name, config in (("a", dict(r=4, target_modules=["q_proj", "v_proj"])), ("b", dict(r=8))):
        single = trained(config)
        expected[name] = single(IDS).logits
        minilora.save_adapter(single, path / name)
    model = tiny_llama()
    for name in ("a", "b"):
        minilora.load_adapter(model, path / name, adapter_name=name)
    expected[None] = tiny_llama()(IDS).logits
    return model, expected


def test_each_adapter_gives_its_own_outputs(two_adapters):
    model, expected = two_adapters
    assert minilora.adapter_names(model) == ["a", "b"]
    for name in ("a", "b", "a"):
        minilora.set_adapter(model, name)
        assert minilora.active_adapter(model) == name
        assert torch.equal(model(IDS).logits, expected[name])
    assert not torch.allclose(expected["a"], expected["b"])


def test_disable_adapters_gives_the_base_and_restores_after(two_adapters):
    model, expected = two_adapters
    minilora.set_adapter(model, "b")
    with minilora.disable_adapters(model):
        assert torch.equal(model(IDS).logits, expected[None])
    assert torch.equal(model(IDS).logits, expected["b"])
    with pytest.raises(RuntimeError):
        with minilora.disable_adapters(model):
            raise RuntimeError("the adapters come back even when the block fails")
    assert torch.equal(model(IDS).logits, expected["b"])


def test_one_disable_adapters_object_entered_twice_nests(two_adapters):
    """Each entry keeps its own flags: the inner exit used to overwrite what the outer one restores,
    so the adapters stayed disabled after both blocks (issue 30)."""
    model, expected = two_adapters
    minilora.set_adapter(model, "a")
    disabled = minilora.disable_adapters(model)
    with disabled:
        with disabled:
            assert torch.equal(model(IDS).logits, expected[None])
        assert torch.equal(model(IDS).logits, expected[None])
    assert torch.equal(model(IDS).logits, expected["a"])


@pytest.mark.parametrize("add", [
    lambda model, tmp_path: minilora.inject(model, r=2, adapter_name="c"),
    lambda model, tmp_path: minilora.load_adapter(model, save_b(tmp_path), adapter_name="c"),
], ids=["inject", "load_adapter"])
def test_adding_an_adapter_inside_disable_adapters_is_refused(add, tmp_path):
    """The new adapter ran inside a block that promises the base model (issue 30), also on a model with
    no adapter yet, whose block had no layer to disable."""
    for model in (minilora.inject(tiny_llama(), r=2, target_modules=["q_proj"], adapter_name="a"), tiny_llama()):
        names = minilora.adapter_names(model)
        with minilora.disable_adapters(model):
            with pytest.raises(ValueError, match="inside `with minilora.disable_adapters.*add it after the block"):
                add(model, tmp_path)
            assert torch.equal(model(IDS).logits, tiny_llama()(IDS).logits)
        assert minilora.adapter_names(model) == names
    add(model, tmp_path)  # after the block
    assert minilora.adapter_names(model) == ["c"]


def save_b(tmp_path):
    path = tmp_path / "b"
    if not path.exists():
        minilora.save_adapter(randomize_adapters(minilora.inject(tiny_llama(), r=2, target_modules=["v_proj"])), path)
    return path


def test_mixed_batch_rows_equal_row_by_row_results(two_adapters):
    model, expected = two_adapters
    rows = ["a", None, "b", "a"]
    ids = IDS[[0, 1, 0, 1]]
    with minilora.mixed_batch(model, rows):
        mixed = model(ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i % 2], rtol=0, atol=1e-5)


def test_mixed_batch_needs_one_known_name_per_row(two_adapters):
    model, _ = two_adapters
    with pytest.raises(ValueError, match="unknown adapter 'c'; the model has: a, b"):
        minilora.mixed_batch(model, ["a", "c"])
    with pytest.raises(ValueError, match="3 adapter names for 2 rows"):
        with minilora.mixed_batch(model, ["a", "b", None]):
            model(IDS)


def test_switching_changes_no_module_parameter_or_shape(two_adapters):
    model, _ = two_adapters

    def structure():
        return ([(n, type(m)) for n, m in model.named_modules()],
                [(n, p.shape, p.dtype, p.data_ptr()) for n, p in model.named_parameters()])

    minilora.set_adapter(model, "a")
    before = structure()
    minilora.set_adapter(model, "b")
    assert structure() == before


def test_set_adapter_with_an_unknown_name_lists_the_known_ones(two_adapters):
    model, _ = two_adapters
    with pytest.raises(ValueError, match="unknown adapter 'c'; the model has: a, b"):
        minilora.set_adapter(model, "c")


def test_delete_adapter_removes_it_everywhere():
    model = minilora.inject(tiny_llama(), r=4, adapter_name="a")
    minilora.inject(model, r=4, adapter_name="b")
    minilora.delete_adapter(model, "b")
    assert minilora.adapter_names(model) == ["a"] and minilora.active_adapter(model) is None
    assert not [n for n, _ in model.named_parameters() if ".adapters.b." in n]
    assert torch.equal(model(IDS).logits, tiny_llama()(IDS).logits)  # nothing active: the base
    with pytest.raises(ValueError, match="unknown adapter 'b'; the model has: a"):
        minilora.delete_adapter(model, "b")
    minilora.inject(model, r=4, adapter_name="b")  # the name is free again


def test_inject_makes_only_the_new_adapter_trainable():
    model = minilora.inject(tiny_llama(), r=4, adapter_name="a")
    minilora.inject(model, r=4, adapter_name="b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in minilora.lora_parameters(model, "b")}
    minilora.mark_only_lora_trainable(model, adapter_name="a")  # how a trainer switches what trains
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
           {n for n, _ in minilora.lora_parameters(model, "a")}


# Runs in a fresh interpreter with PJRT_DEVICE=CPU (conftest.run_xla). Warm-up: two rounds of a
# train step and an eval forward with adapter "a" compile every graph; then "b" (same shapes) must
# run on those graphs: no new CompileTime sample and no new UncachedCompile. "b" has another alpha
# (scaling 1.0 against 2.0): a scaling compiled in as a constant would show up here as recompiles.
XLA_SWITCH = """
import json, sys
import torch, torch_xla
import torch_xla.debug.metrics as met
sys.path.insert(0, "tests")
from conftest import randomize_adapters, tiny_llama
import minilora

def compiles():
    data = met.metric_data("CompileTime")
    return (data[0] if data else 0) + (met.counter_value("UncachedCompile") or 0)

device = torch_xla.device()
model = tiny_llama(num_hidden_layers=1)
# LoRA on the seven projections and the embeddings, and a trainable lm_head copy per adapter
targets = dict(target_modules=[*minilora.LLAMA_TARGETS, "embed_tokens"], modules_to_save=["lm_head"])
minilora.inject(model, r=4, adapter_name="a", **targets)
minilora.inject(model, r=4, alpha=4, adapter_name="b", **targets)
randomize_adapters(model)
model.to(device)
ids = torch.randint(3, 128, (2, 16)).to(device)
optimizers = {n: torch.optim.SGD([p for _, p in minilora.lora_parameters(model, n)], lr=0.1) for n in "ab"}

def round_trip(name):
    minilora.set_adapter(model, name)
    minilora.mark_only_lora_trainable(model, adapter_name=name)
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizers[name].step()
    optimizers[name].zero_grad(set_to_none=True)
    torch_xla.sync()
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    torch_xla.sync()
    return logits.cpu()

round_trip("a")
a = round_trip("a")
warm = compiles()
b = round_trip("b")
b = round_trip("b")
print(json.dumps({"warm": warm, "new": compiles() - warm, "a_vs_b": (a - b).abs().max().item()}))
"""


def test_switching_adapters_reuses_the_compiled_xla_graphs():
    result = run_xla(XLA_SWITCH)
    assert result["warm"] > 0  # the counters do count compiles here
    assert result["new"] == 0
    assert result["a_vs_b"] > 1e-3  # and "b" really ran: its outputs differ from "a"'s
