"""train/loss.py: the one next-token loss that training, evaluation and chat drift share; the
chunked linear cross-entropy equals the unfused LM head + cross-entropy (loss and gradients,
float32 and bfloat16, ignored labels, tied embeddings), and the app's summed NLL takes the chunked
path only where the model allows it."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_rounding, run_xla, tiny_llama
from minilora_train import loss as loss_mod
from minilora_train.loss import IGNORE, nll_result, next_token_nll, predicted_tokens


def unfused(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE, reduction="sum")


def loss_and_grads(fn, hidden, weight, labels):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, labels)
    (loss * 0.5).backward()  # an upstream gradient other than 1, as the app's 1 / tokens
    return loss, hidden.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_and_gradients_equal_the_unfused_head_and_cross_entropy(dtype):
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 24, 300  # 37 tokens in chunks of 8: four whole chunks and a ragged one
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.2).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 6, 36]] = IGNORE
    expected = loss_and_grads(unfused, hidden, weight, labels)
    got = loss_and_grads(lambda *a: loss_mod.chunked_nll(*a, rows=8), hidden, weight, labels)
    # Tolerance: the rounding of float32 sums over the vocabulary (log-sum-exp) and the tokens
    # (the loss); the gradients are GEMMs in ``dtype`` over the vocabulary (hidden's) or the
    # tokens (the weight's, whose chunks the unfused path sums in one GEMM), so their rounding
    # is dtype's, over that many terms.
    assert_close_to_rounding(got[0], expected[0], reduction=v + n)
    assert_close_to_rounding(got[1], expected[1], reduction=v)
    assert_close_to_rounding(got[2], expected[2], reduction=n)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    assert torch.equal(got[1][[0, 5, 6, 36]], torch.zeros(4, h, dtype=dtype))  # ignored: no gradient


# Runs in a fresh interpreter with PJRT_DEVICE=CPU (conftest.run_xla): on XLA the chunks are one
# scan (a While loop) in the step's graph, 37 tokens padded to 5 chunks of 8. Three steps of new
# values at the same shapes: one compile, no aten:: op falling back to the CPU, and each step's
# loss and gradients those of the unfused head and cross-entropy computed eagerly; then the loss
# alone under no_grad, as evaluation runs it, and hidden's gradient alone under a frozen head (LoRA).
XLA_CHUNKED = """
import json
import torch, torch_xla
import torch.nn.functional as F
import torch_xla.debug.metrics as met
from minilora_train.loss import IGNORE, chunked_nll

device = torch_xla.device()
g = torch.Generator().manual_seed(0)
n, h, v = 37, 24, 300
weight = torch.randn(v, h, generator=g) * 0.2
steps = []
for _ in range(3):
    hidden = torch.randn(n, h, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 36]] = IGNORE
    x, w = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
    loss = chunked_nll(x, w, labels.to(device), rows=8)
    (loss * 0.5).backward()
    torch_xla.sync()
    x0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = F.cross_entropy(F.linear(x0, w0), labels, ignore_index=IGNORE, reduction="sum")
    (expected * 0.5).backward()
    steps.append([[loss.cpu().item(), expected.item()], [x.grad.cpu().tolist(), x0.grad.tolist()],
                  [w.grad.cpu().tolist(), w0.grad.tolist()]])
training_compiles = met.metric_data("CompileTime")[0]
with torch.no_grad():  # evaluation: the loss alone, its own graph
    evaluated = chunked_nll(hidden.to(device), weight.to(device), labels.to(device), rows=8).cpu().item()
x = hidden.to(device).requires_grad_()  # LoRA: a frozen head, so hidden's gradient alone
(chunked_nll(x, weight.to(device), labels.to(device), rows=8) * 0.5).backward()
torch_xla.sync()
print(json.dumps({"steps": steps, "compiles": training_compiles, "evaluated": [evaluated, expected.item()],
                  "frozen_head": [x.grad.cpu().tolist(), x0.grad.tolist()],
                  "fallbacks": [k for k in met.counter_names() if k.startswith("aten::")]}))
"""


def test_the_chunked_loss_runs_on_xla_as_one_loop_compiled_once_and_equals_the_unfused_loss():
    result = run_xla(XLA_CHUNKED)
    assert result["compiles"] == 1 and result["fallbacks"] == []
    n, v = 37, 300
    for (loss, expected_loss), (grad_x, expected_x), (grad_w, expected_w) in result["steps"]:
        # as on the CPU: float32 sums over the vocabulary and the tokens, in another order
        assert_close_to_rounding(torch.tensor(loss), torch.tensor(expected_loss), reduction=v + n)
        assert_close_to_rounding(torch.tensor(grad_x), torch.tensor(expected_x), reduction=v)
        assert_close_to_rounding(torch.tensor(grad_w), torch.tensor(expected_w), reduction=n)
    assert_close_to_rounding(torch.tensor(result["evaluated"][0]), torch.tensor(result["evaluated"][1]), reduction=v + n)
    assert_close_to_rounding(torch.tensor(result["frozen_head"][0]), torch.tensor(result["frozen_head"][1]), reduction=v)


def test_the_chunked_loss_forms_gradients_in_forward_only_when_one_will_be_asked_for():
    # Forward turns each chunk's logits into their gradient when training; under torch.no_grad
    # (evaluation) it must compute the loss alone, with no gradient product.
    from test_layer import OpRecorder

    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(20, 16, generator=g, requires_grad=True), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (20,), generator=g)

    def products(record):  # (GEMMs, scatters of the one-hot)
        names = [name for name, _ in record.ops]
        return names.count("aten.mm.default"), names.count("aten.scatter_add_.default")

    with OpRecorder() as evaluating, torch.no_grad():
        loss = loss_mod.chunked_nll(hidden, weight, labels, rows=8)
    with OpRecorder() as training:
        trained = loss_mod.chunked_nll(hidden, weight, labels, rows=8)
    assert loss.grad_fn is None and torch.equal(loss, trained.detach())
    assert products(evaluating) == (3, 0)  # 20 tokens in chunks of 8: three chunks' logits, nothing else
    assert products(training) == (6, 3)  # and each chunk's logit gradient times the weight


def test_chunk_rows_bounds_a_chunks_logits_by_the_hidden_states():
    assert loss_mod.chunk_rows(4096, 576, 49152) == 256  # SmolLM2, 8 x 512: 64 by memory, 256 at least
    assert loss_mod.chunk_rows(16384, 2048, 128256) == 512  # Llama-3.2-1B, 8 x 2048: 32 chunks
    assert loss_mod.chunk_rows(65536, 2048, 128256) == 2048  # 8 x 8192: the memory rule's 2,048
    assert loss_mod.chunk_rows(5, 64, 100) == 5 and loss_mod.chunk_rows(1, 64, 10**6) == 1


@pytest.mark.parametrize("tied", [False, True])
def test_the_apps_summed_nll_is_the_same_chunked_or_not(tied):
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = IGNORE  # a prompt's tokens carry no loss
    results = []
    for chunked in (False, True):
        model = tiny_llama(vocab_size=100, tie_word_embeddings=tied).train()
        assert loss_mod.fusable(model)
        nll = loss_mod.summed_nll(model, ids, labels, chunked=chunked)
        nll.backward()
        results.append((nll, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert_close_to_rounding(chunked, plain, reduction=100 + 24)
    assert plain_grads.keys() == chunked_grads.keys()
    if tied:  # one shared matrix: the head's gradient and the embedding's meet in it
        model = tiny_llama(vocab_size=100, tie_word_embeddings=True)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, grad in plain_grads.items():
        assert_close_to_rounding(chunked_grads[name], grad, reduction=100 + 24 + 64)


def test_the_app_chunks_the_loss_by_default_on_cuda_and_cpu_and_on_xla_only_when_asked():
    from types import SimpleNamespace

    from minilora_train.config import UsageError, parse_args
    from minilora_train.loop import loss_is_chunked

    def device(kind, layout="single"):
        return SimpleNamespace(is_xla=kind == "xla", layout=SimpleNamespace(kind=layout, ways=4))

    base = ["--model_name", "m", "--dataset_dir", "d"]
    default, asked, off = (parse_args(base + extra) for extra in ([], ["--chunked_loss"], ["--no-chunked_loss"]))
    assert [loss_is_chunked(args, device("cpu")) for args in (default, asked, off)] == [True, True, False]
    assert [loss_is_chunked(args, device("xla")) for args in (default, asked, off)] == [False, True, False]
    assert not loss_is_chunked(default, device("xla", "spmd"))  # the full logits, each device its rows'
    with pytest.raises(UsageError, match=r"^--chunked_loss: under SPMD \(4 devices\)"):
        loss_is_chunked(asked, device("xla", "spmd"))


def test_models_whose_head_is_not_a_plain_linear_take_the_full_logits():
    model = tiny_llama(vocab_size=100)
    assert loss_mod.fusable(model)

    class Wrapper(torch.nn.Module):  # as PEFT's or torch_xla's FSDP wrappers: its forward must run,
        def __init__(self, module):  # though it hands out the model's attributes (head, config)
            super().__init__()
            self.module = module

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    assert not loss_mod.fusable(Wrapper(model))
    model.config.model_type = "gemma2"  # soft-capped logits
    assert not loss_mod.fusable(model)



def test_next_token_nll_sums_each_predicted_token_once_and_skips_ignored_labels():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, IGNORE, 4, 5], [6, IGNORE, IGNORE, 0, 3]])
    # By hand: position t predicts labels[t + 1]; the first label of a row is never scored.
    expected = sum(-F.log_softmax(logits[b, t], dim=-1)[labels[b, t + 1]]
                   for b in range(2) for t in range(4) if labels[b, t + 1] != IGNORE)
    assert next_token_nll(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert int(predicted_tokens(labels)) == 3 + 2


def test_nll_result_reports_nothing_it_did_not_measure():
    assert nll_result(6.0, 3) == {"loss": 2.0, "perplexity": math.exp(2.0), "tokens": 3}
    empty = nll_result(0.0, 0)  # no token predicted: no loss, rather than a made-up 0
    assert math.isnan(empty["loss"]) and math.isnan(empty["perplexity"]) and empty["tokens"] == 0
    assert nll_result(1e6, 1)["perplexity"] == math.inf  # past float range, not an OverflowError
