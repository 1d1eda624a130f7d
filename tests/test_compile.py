"""minilora under torch.compile: the LoRA node and its dropout mask trace (the mask op's fake
implementation reports the dtype the real one returns), compiled forward and backward equal eager,
and what an adapter switch costs in recompiles. Small modules: compiling is slow on 2 cores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import minilora
from conftest import assert_close_to_rounding, train_argv


class Block(nn.Module):
    """Two Linears reading the same input, as q and k do: each must draw its own mask (a compiler
    that merged the two identical-looking mask calls would drop the same elements in both)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.o(nn.functional.silu(self.q(x)) * self.k(x))


def adapted(dropout: float, names=("default",)):
    torch.manual_seed(0)
    model = Block()
    for name in names:
        minilora.inject(model, r=4, dropout=dropout, target_modules=["q", "k", "o"], adapter_name=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in minilora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def step(model, x):
    """Loss and gradients (x's, then each adapter's) of one forward and backward, the dropout
    masks drawn from seed 7."""
    torch.manual_seed(7)
    loss = model(x).square().sum()
    loss.backward()
    grads = [x.grad.clone()] + [p.grad.clone() for _, p in minilora.lora_parameters(model)]
    x.grad = None
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("backend, dropout", [("aot_eager", 0.0), ("aot_eager", 0.1), ("inductor", 0.1)])
def test_compiled_forward_and_backward_equal_eager(backend, dropout):
    torch._dynamo.reset()
    model = adapted(dropout)
    x = torch.randn(3, 5, 16, requires_grad=True)
    loss, grads = step(model, x)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        got_loss, got_grads = step(compiled, x)
        # the same masks (the op draws from torch's generator, compiled or not) and the same
        # arithmetic, which inductor may fuse and reorder: sums over at most 16 + 32 + 32 terms
        assert_close_to_rounding(got_loss, loss, reduction=16 * 5 * 3)
        for ours, reference in zip(got_grads, grads):
            assert_close_to_rounding(ours, reference, reduction=16 + 32 + 32)


def test_an_adapter_switch_costs_one_recompile_per_adapter_then_none():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = adapted(0.1, names=("a", "b"))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(3, 5, 16)
    compiles = []
    for name in ("a", "a", "b", "b", "a", "b"):
        minilora.set_adapter(model, name)
        compiled(x)
        compiles.append(counter.frame_count)
    # The active adapter's name is guarded on: the first call with each adapter compiles once
    # (docs/library.md), later switches reuse the cached graphs.
    assert compiles == [1, 1, 2, 2, 2, 2]


def test_the_apps_compile_flag_trains_as_eager_and_compiles_only_during_warmup(tiny_model_dir, tiny_text_file,
                                                                                 tmp_path, monkeypatch):
    from minilora_train.config import parse_args
    from minilora_train.loop import run

    def losses(out):
        import json

        with open(out / "metrics.jsonl") as f:
            return [m["train_loss"] for m in map(json.loads, f) if "train_loss" in m]

    flags = ("--lora_dropout", "0.1", "--max_steps", "5", "--max_eval_samples", "8", "--general_eval_dataset", "none")
    eager = run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "eager", *flags)))
    # aot_eager: the same tracing, graph and autograd as the default inductor backend without its
    # C++ code generation, which takes minutes on 2 busy cores (inductor itself: the tests above)
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager"))
    torch._dynamo.reset()
    compiled = run(parse_args(train_argv(tiny_model_dir, tiny_text_file, tmp_path / "compiled", "--compile", *flags)))
    assert compiled["compile"]["compiles_during_warmup"] >= 1 and compiled["compile"]["warmup_seconds"] > 0
    assert compiled["compile"]["compiles_after_warmup"] == 0, compiled["compile"]
    assert eager["compile"] == {}
    # the same masks and arithmetic: losses equal to float32 rounding over the vocabulary's sums
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
