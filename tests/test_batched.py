"""Batched multi-adapter inference (minilora/batched.py): every row of a mixed batch equals that row
run alone with its own adapter, for LoRA, rsLoRA, DoRA and mixed ranks, in decode (one token a row)
and prefill; a row without an adapter gets the base; a new mix of adapters compiles nothing new
under torch.compile and XLA; the slots fill least-recently-used first, and a batch in flight keeps
its own adapters while others load."""

from __future__ import annotations

import threading

import pytest
import torch

import minilora
from conftest import assert_close_to_rounding, run_xla, tiny_llama, trained
from minilora.batched import AdapterBank, BankFullError, SlotTable

# Four adapters of every kind a bank stacks: plain LoRA on two projections, rsLoRA and DoRA on all
# seven, and a rank-16 one on two others (the stacks pad every rank to the largest, 16).
ADAPTERS = {
    "lora": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "rs": dict(r=8, alpha=8, use_rslora=True),
    "dora": dict(r=4, alpha=4, use_dora=True),
    "wide": dict(r=16, alpha=16, target_modules=["o_proj", "down_proj"]),
}
ROWS = ["rs", None, "dora", "lora", "wide", "rs"]
# 64 hidden, 128 intermediate: each logit comes out of sums of a few hundred terms per layer
REDUCTION = 128 * 4


def served_model(names=tuple(ADAPTERS), seed: int = 0):
    """A tiny Llama with ``names`` adapters, every adapter tensor moved off its initial value
    (B off zero, DoRA's magnitude off the base's norm), all frozen as load_adapter leaves them."""
    model = tiny_llama(seed)
    for name in names:
        minilora.inject(model, adapter_name=name, **ADAPTERS[name])
    minilora.mark_only_lora_trainable(model)  # every adapter, for trained() to move
    return trained(model, seed + 1).requires_grad_(False).eval()


def alone(model, ids, name):
    """Each row of ``ids`` run as a batch of one through adapter ``name`` (None: the base)."""
    with torch.no_grad():
        if name is None:
            with minilora.disable_adapters(model):
                return model(ids).logits
        minilora.set_adapter(model, name)
        return model(ids).logits


@pytest.fixture(scope="module")
def model():
    return served_model()


@pytest.mark.parametrize("tokens", [1, 12], ids=["decode", "prefill"])
def test_each_row_equals_that_row_run_alone_with_its_adapter(model, tokens):
    ids = torch.randint(3, 128, (len(ROWS), tokens), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), minilora.mixed_batch(model, ROWS):
        mixed = model(ids).logits
    for i, name in enumerate(ROWS):
        assert_close_to_rounding(mixed[i], alone(model, ids[i:i + 1], name)[0], reduction=REDUCTION)
    assert not torch.allclose(mixed[0], mixed[3], atol=1e-3)  # the adapters do differ


def test_a_quantized_base_serves_mixed_batches_too():
    model = minilora.quantize(tiny_llama(), "nf4")
    for name in ("lora", "rs", "wide"):
        minilora.inject(model, adapter_name=name, **ADAPTERS[name])
    minilora.mark_only_lora_trainable(model)
    trained(model, 11).requires_grad_(False)
    rows = ["wide", None, "rs", "lora"]
    ids = torch.randint(3, 128, (len(rows), 1), generator=torch.Generator().manual_seed(12))
    with torch.inference_mode(), minilora.mixed_batch(model, rows):
        mixed = model(ids).logits
    for i, name in enumerate(rows):
        assert_close_to_rounding(mixed[i], alone(model, ids[i:i + 1], name)[0], reduction=REDUCTION)


def test_rows_without_an_adapter_get_the_base_exactly(model):
    ids = torch.randint(3, 128, (4, 1), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        with minilora.disable_adapters(model):
            base = model(ids).logits
        with minilora.mixed_batch(model, ["dora", None, "wide", None]):
            mixed = model(ids).logits
    assert torch.equal(mixed[1], base[1]) and torch.equal(mixed[3], base[3])  # x Wᵀ + 0, times 1


def test_the_mixed_batch_is_served_stacked_and_trains_per_adapter(model):
    """In eval mode without gradients the rows go through the stacks; with a trainable adapter and
    autograd on, each adapter runs over its own rows and its weights get gradients."""
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    calls = []
    layer = model.model.layers[0].self_attn.q_proj
    original = type(layer.adapters["rs"]).forward
    type(layer.adapters["rs"]).forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        with torch.no_grad(), minilora.mixed_batch(model, ["rs", "lora"]):
            stacked = model(ids).logits
        assert calls == []  # no adapter module ran: the stacks served every row
        trainable = layer.adapters["rs"].lora_B
        trainable.requires_grad_(True)
        with minilora.mixed_batch(model, ["rs", "lora"]):
            looped = model(ids).logits
        looped.sum().backward()
        assert calls and trainable.grad is not None and trainable.grad.abs().max() > 0
        assert_close_to_rounding(looped.detach(), stacked, reduction=REDUCTION)
    finally:
        type(layer.adapters["rs"]).forward = original
        layer.adapters["rs"].lora_B.requires_grad_(False)
        layer.adapters["rs"].lora_B.grad = None


def test_a_trainable_dora_adapter_with_autograd_on_is_refused_in_one_line():
    model = served_model(("dora", "lora"))
    model.model.layers[0].mlp.up_proj.adapters["dora"].lora_magnitude_vector.requires_grad_(True)
    ids = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(13))
    with minilora.mixed_batch(model, ["dora", "lora"]):
        with pytest.raises(ValueError, match="trainable DoRA adapter and autograd is on.*torch.no_grad"):
            model(ids)
        with torch.no_grad():
            model(ids)


def test_an_adapter_changed_after_stacking_is_stacked_again():
    model = served_model(("lora", "rs"))
    ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode(), minilora.mixed_batch(model, ["rs", "lora"]):
        model(ids)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.adapters["rs"].lora_B.mul_(3)  # say, an optimizer step
    with torch.inference_mode(), minilora.mixed_batch(model, ["rs", "lora"]):
        mixed = model(ids).logits
    assert_close_to_rounding(mixed[0], alone(model, ids[:1], "rs")[0], reduction=REDUCTION)


def test_the_models_own_bank_grows_with_new_adapters_and_larger_ranks():
    """Without a bank of one's own, every adapter keeps a slot and every rank fits: an adapter
    added, or one replaced by a larger rank under the same name, brings a bigger bank."""
    from minilora.adapters import adapter_state

    model = served_model(("lora", "rs"))
    ids = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(14))
    with torch.inference_mode(), minilora.mixed_batch(model, ["rs", "lora"]):
        model(ids)
    first = adapter_state(model).bank
    assert (first.capacity, first.max_rank) == (2, 8)
    minilora.delete_adapter(model, "rs")
    minilora.inject(model, adapter_name="rs", r=32, alpha=8)
    minilora.inject(model, adapter_name="wide", **ADAPTERS["wide"])
    minilora.mark_only_lora_trainable(model)
    trained(model, 15).requires_grad_(False)
    with torch.inference_mode(), minilora.mixed_batch(model, ["rs", "wide"]):
        mixed = model(ids).logits
    bank = adapter_state(model).bank
    assert bank is not first and (bank.capacity, bank.max_rank) == (3, 32)
    for i, name in enumerate(["rs", "wide"]):
        assert_close_to_rounding(mixed[i], alone(model, ids[i:i + 1], name)[0], reduction=REDUCTION)


def test_a_bank_with_fewer_slots_than_adapters_evicts_the_least_recently_used():
    model = served_model()
    bank = AdapterBank(model, capacity=2)
    ids = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(6))
    for rows in (["rs", "lora"], ["dora", "rs"], ["wide", None], ["lora", "dora"]):
        with torch.inference_mode(), minilora.mixed_batch(model, rows, bank=bank):
            mixed = model(ids).logits
        for i, name in enumerate(rows):
            assert_close_to_rounding(mixed[i], alone(model, ids[i:i + 1], name)[0], reduction=REDUCTION)
    assert bank.resident == ["dora", "lora"]  # "wide", the least recently used, made room for "lora"
    with pytest.raises(BankFullError, match="3 distinct adapters.*has 2"):
        with minilora.mixed_batch(model, ["rs", "lora", "wide"], bank=bank):
            pass
    assert all(m.row_adapters is None for _, m in minilora.lora_modules(model))  # a refused batch left nothing set


def test_loading_an_adapter_leaves_the_batch_in_flight_as_it_was():
    """Another thread fills a slot while a batch runs: the batch's own slots are never the ones
    written, so its rows give what they gave before the load."""
    model = served_model()
    bank = AdapterBank(model, capacity=3)
    ids = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode(), minilora.mixed_batch(model, ["rs", "lora"], bank=bank):
        before = model(ids).logits
        bank.prefetch(["wide"])  # fills the last free slot
        loader = threading.Thread(target=bank.prefetch, args=(["dora"],))  # evicts "wide", not rs or lora
        loader.start()
        during = model(ids).logits
        loader.join()
        after = model(ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert sorted(bank.resident) == ["dora", "lora", "rs"]
    with pytest.raises(BankFullError, match="batch in flight"):
        with minilora.mixed_batch(model, ["rs", "lora"], bank=bank):
            bank.prefetch(["wide"])  # dora is free to go, but rs and lora are held: one slot is
            bank.prefetch(["dora", "wide"])  # not enough for two more


def test_the_slot_table_is_least_recently_used_and_keeps_held_slots():
    table = SlotTable(2)
    assert table.place(["a", "b"]) == ({"a": 1, "b": 2}, ["a", "b"])
    assert table.place(["a"]) == ({"a": 1}, [])  # "b" is now the least recently used
    assert table.place(["c"]) == ({"c": 2}, ["c"])
    table.hold(["c"])
    assert table.place(["d"]) == ({"d": 1}, ["d"])  # "a" goes: "c" is held by a batch in flight
    with pytest.raises(BankFullError):
        table.place(["e", "d"])  # needs two slots; "c" is held
    table.release(["c"])
    assert table.place(["e", "d"]) == ({"e": 2, "d": 1}, ["e"])
    with pytest.raises(ValueError, match="at least one slot"):
        SlotTable(0)


def test_a_rank_above_the_bank_is_refused_in_one_line():
    model = served_model(("lora", "wide"))
    with pytest.raises(ValueError, match="max_rank=8, but this model holds an adapter of rank 16"):
        AdapterBank(model, max_rank=8)
    bank = AdapterBank(served_model(("lora",)), max_rank=8)
    assert bank.max_rank == 8 and bank.capacity == 1


def test_a_new_mix_compiles_nothing_new_under_torch_compile():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = served_model(("lora", "rs", "dora"))
    compiled = torch.compile(model, backend="eager")  # graph capture and guards: what a recompile needs
    ids = torch.randint(3, 128, (3, 1), generator=torch.Generator().manual_seed(8))
    torch._dynamo.reset()
    outputs = {}
    mixes = [("rs", "lora", None), ("dora", "dora", "rs"), (None, None, "lora"), ("lora", "rs", "dora")]
    with torch.inference_mode():
        for i, rows in enumerate(mixes):
            with minilora.mixed_batch(model, list(rows)):
                outputs[rows] = compiled(ids).logits
            if i == 0:
                warm = counters["stats"]["unique_graphs"]
    assert warm > 0 and counters["stats"]["unique_graphs"] == warm
    for rows, logits in outputs.items():
        with torch.inference_mode(), minilora.mixed_batch(model, list(rows)):
            assert_close_to_rounding(logits, model(ids).logits, reduction=REDUCTION)


# Runs in a fresh interpreter with PJRT_DEVICE=CPU (conftest.run_xla). The three adapters are put
# into slots and the writes cut off into their own graph; a first mix compiles the forward, and
# every later mix of the same batch size must run on that graph: no new CompileTime sample.
XLA_MIXES = """
import json, sys
import torch, torch_xla
import torch_xla.debug.metrics as met
sys.path.insert(0, "tests")
from test_batched import served_model
import minilora

def compiles():
    data = met.metric_data("CompileTime")
    return (data[0] if data else 0) + (met.counter_value("UncachedCompile") or 0)

model = served_model(("lora", "rs", "dora"))
ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(9))
mixes = [["rs", "lora", None], ["dora", "dora", "rs"], [None, None, "lora"], ["lora", "rs", "dora"]]
expected = []
with torch.no_grad():
    for rows in mixes:
        with minilora.mixed_batch(model, rows):
            expected.append(model(ids).logits)
device = torch_xla.device()
model.to(device)
bank = minilora.AdapterBank(model)
bank.prefetch(["lora", "rs", "dora"])
torch_xla.sync()
worst, warm = 0.0, None
with torch.no_grad():
    for i, rows in enumerate(mixes + mixes):
        with minilora.mixed_batch(model, rows, bank=bank):
            logits = model(ids.to(device)).logits
        torch_xla.sync()
        worst = max(worst, (logits.cpu() - expected[i % len(mixes)]).abs().max().item())
        if i == 0:
            warm = compiles()
print(json.dumps({"warm": warm, "new": compiles() - warm, "worst": worst}))
"""


def test_a_new_mix_compiles_nothing_new_on_xla():
    result = run_xla(XLA_MIXES)
    assert result["warm"] > 0  # the counters do count compiles here
    assert result["new"] == 0
    assert result["worst"] < 1e-4  # XLA's CPU kernels against eager's: the same sums in another order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run tests/test_batched.py on one")
def test_on_cuda_offloaded_adapters_reach_their_slots_through_the_copy_stream():
    """On a GPU: adapters kept on the host (offload) are copied into their slots on the bank's own
    stream, a batch in flight keeps its results while another adapter loads, and every row equals
    that row alone on the CPU."""
    rows = ["rs", None, "dora", "lora"]  # three of the four adapters: "wide" loads while they run
    cpu = served_model()
    ids = torch.randint(3, 128, (len(rows), 4), generator=torch.Generator().manual_seed(10))
    expected = [alone(cpu, ids[i:i + 1], name)[0] for i, name in enumerate(rows)]
    model = served_model().cuda()
    bank = AdapterBank(model, capacity=4)
    for name in ADAPTERS:
        bank.offload(name)
    assert all(p.device.type == "cpu" and p.is_pinned() for n, p in model.named_parameters() if "adapters." in n)
    with torch.inference_mode(), minilora.mixed_batch(model, rows, bank=bank):
        first = model(ids.cuda()).logits
        bank.prefetch(["wide"])
        again = model(ids.cuda()).logits
    assert torch.equal(first, again) and "wide" in bank.resident
    for i in range(len(rows)):
        torch.testing.assert_close(first[i].cpu(), expected[i], rtol=1e-4, atol=1e-4)  # TF32 and CUDA's own sums
    bank.restore("rs")
    minilora.set_adapter(model, "rs")
    with torch.inference_mode():
        torch.testing.assert_close(model(ids[:1].cuda()).logits[0].cpu(), expected[0], rtol=1e-4, atol=1e-4)
