"""LoRA trains under gradient checkpointing, reentrant or not: with a frozen base, reentrant
checkpointing gives no gradient to anything inside a checkpointed block unless the block's input
requires grad, and minilora makes the embeddings' output require it."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import minilora
from conftest import tiny_llama

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def lora_b_grads(model):
    model.train()
    model(IDS, labels=IDS).loss.backward()
    return {n: p.grad for n, p in minilora.lora_parameters(model) if n.endswith("lora_B")}


@pytest.fixture(scope="module")
def reference():
    return lora_b_grads(minilora.inject(tiny_llama(), r=4))  # no checkpointing


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("inject_first", [True, False])
@pytest.mark.parametrize("transformers_hook", [True, False])
def test_lora_b_gets_the_same_gradients_with_checkpointing(reference, use_reentrant, inject_first,
                                                          transformers_hook):
    model = tiny_llama()
    if inject_first:
        minilora.inject(model, r=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if not transformers_hook:
        # transformers 5 makes the embeddings' output require grad itself; 4.x did so only for PEFT
        # models. Without its hook, minilora's own (installed by inject) must do the job.
        model.disable_input_require_grads()
    if not inject_first:
        minilora.inject(model, r=4)
    grads = lora_b_grads(model)

    assert grads.keys() == reference.keys() and len(grads) == 2 * 7
    for name, grad in grads.items():
        assert grad is not None and torch.count_nonzero(grad) > 0, name
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-7)


class CheckpointedToy(nn.Module):
    """A model checkpointing its block with reentrant checkpointing, outside transformers' helpers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 32)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        return self.head(checkpoint(self.block, self.embed(ids), use_reentrant=True))


def test_enable_input_require_grads_serves_models_with_their_own_checkpointing():
    torch.manual_seed(0)
    model = minilora.inject(CheckpointedToy(), target_modules=["block.0"], r=2)
    ids = torch.randint(0, 32, (4, 5))
    # the failure this exists for: no path from the loss to the adapter inside the checkpoint
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        with pytest.raises(RuntimeError, match="does not require grad"):
            model(ids).sum().backward()

    minilora.enable_input_require_grads(model)
    model(ids).sum().backward()
    assert torch.count_nonzero(model.block[0].lora_B.grad) > 0


def test_an_inference_forward_never_asks_the_model_whether_it_checkpoints(monkeypatch):
    # Asking walks every module (one per adapter and layer); with 64 adapters loaded that walk cost
    # a decode step more than the adapters. Only a forward that records autograd needs the answer.
    import importlib

    module = importlib.import_module("minilora.inject")  # the attribute minilora.inject is the function
    asked = []
    real = module._is_checkpointing
    monkeypatch.setattr(module, "_is_checkpointing", lambda model: asked.append(1) or real(model))
    model = minilora.inject(tiny_llama(), r=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()  # minilora's own hook is the one that must act
    model.eval()
    with torch.no_grad():
        model(IDS)
    with torch.inference_mode():
        model(IDS)
    assert asked == []
    model.train()
    loss = model(IDS, labels=IDS).loss  # recording: the hook asks, and the adapters get gradients
    assert len(asked) == 1
    loss.backward()
    assert all(torch.count_nonzero(p.grad) > 0 for n, p in minilora.lora_parameters(model) if n.endswith("lora_B"))
