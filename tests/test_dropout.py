"""minilora/dropout.py: the keep mask (both CPU ways of drawing it, bernoulli_ and random words, on
every machine), its dtype, and LoRADropout, the one dropout every LoRA and DoRA adapter uses."""

import pytest
import torch

from minilora import dropout


@pytest.mark.parametrize("vectorised_bernoulli", [False, True])
def test_dropout_mask_keeps_each_element_with_probability_one_minus_p(vectorised_bernoulli, monkeypatch):
    # both ways of drawing it: 16-bit uniforms from random words, and bernoulli_ (Intel CPUs, devices)
    monkeypatch.setattr(dropout, "cpu_bernoulli_is_vectorised", lambda: vectorised_bernoulli)
    x = torch.zeros(1000, 1000)
    for p in (0.05, 0.1, 0.5):
        keep = dropout.dropout_mask(x, p)
        assert keep.dtype == torch.bool and keep.shape == x.shape
        # a binomial over 10^6 elements: 5 standard deviations (p's 16-bit rounding, <= 2^-17, is
        # 150 times smaller than one)
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / 1e6) ** 0.5
    # elements are independent: no pattern within a 64-bit word (the random-word path gives four
    # elements one word) nor between neighbouring words
    keep = dropout.dropout_mask(torch.zeros(400_000), 0.5).float().view(-1, 8)
    pairs = (keep[:, :-1] * keep[:, 1:]).mean(0)  # P(both kept) for neighbours 0-1, ..., 6-7
    assert (pairs - 0.25).abs().max() < 5 * (0.25 * 0.75 / 50_000) ** 0.5
    torch.manual_seed(3)
    first = dropout.dropout_mask(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(first, dropout.dropout_mask(x, 0.1))  # torch's generator drives it
    assert not torch.equal(first, dropout.dropout_mask(x, 0.1))


def test_dropout_mask_is_one_byte_per_element_on_cpus_and_gpus():
    # "meta" stands in for a GPU here (any device but CPU and XLA); tests/test_gpu.py checks
    # the values and gradients on CUDA itself. XLA keeps x's dtype (its compiler fuses the mask).
    assert dropout.dropout_mask(torch.zeros(8, 16, device="meta", dtype=torch.bfloat16), 0.1).dtype == torch.bool
    assert dropout.dropout_mask(torch.zeros(8, 16, dtype=torch.bfloat16), 0.1).dtype == torch.bool


@pytest.mark.parametrize("p", [1e-6, 0.05, 0.1, 0.5, 0.99999])
def test_the_random_word_mask_drops_exactly_the_16_bit_uniforms_below_p(p, monkeypatch):
    # The word path's threshold: element i is dropped when its 16-bit uniform (the words' bytes
    # read as int16) is below round(p * 2^16) - 2^15, so p' = round(p * 2^16) / 2^16 (at most
    # 2^16 - 1 of them), within 2^-17 of p.
    monkeypatch.setattr(dropout, "cpu_bernoulli_is_vectorised", lambda: False)
    x = torch.zeros(1000, 77)
    torch.manual_seed(5)
    keep = dropout.dropout_mask(x, p)
    torch.manual_seed(5)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)
    uniform = words.view(torch.int16)[:x.numel()].view(x.shape).to(torch.int32)
    assert torch.equal(keep, uniform >= min(round(p * 2**16), 2**16 - 1) - 2**15)


def test_the_mask_op_reports_under_fake_tensors_the_dtype_it_returns():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(4, 16)
    real = dropout.dropout_mask(x, 0.1)
    with FakeTensorMode() as mode:
        fake = dropout.dropout_mask(mode.from_tensor(x), 0.1)
    assert (fake.dtype, fake.shape) == (real.dtype, real.shape) == (torch.bool, x.shape)


def test_lora_dropout_drops_by_its_mask_and_scales_the_rest_in_training_only():
    drop = dropout.LoRADropout(0.25)
    x = torch.randn(6, 40)
    torch.manual_seed(7)
    dropped = drop(x)
    torch.manual_seed(7)
    keep = dropout.dropout_mask(x, 0.25)  # the same draw: one op, one random stream
    assert torch.equal(dropped, x * keep / 0.75)
    assert keep.logical_not().any() and keep.any()
    drop.eval()
    assert drop(x) is x and drop.keep_mask(x) is None
