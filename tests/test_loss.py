"""train/loss.py: the one next-token loss that training, evaluation and chat drift share."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.loss import IGNORE, nll_result, next_token_nll, predicted_tokens


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
