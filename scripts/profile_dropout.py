"""Where minilora's dropout time goes on the CPU: torch.profiler over forward and backward of three
LoRALinears at SmolLM2-135M's widths (576->576, 576->1536, 1536->576; 1024 tokens, r=16), dropout
0.05 by each CPU mask path (minilora_bench.models.mask_path), then dropout 0 for comparison.

    python scripts/profile_dropout.py > docs/measurements/profile-dropout-cpu-loaded.txt

Prints one operator table per case, sorted by self time. Shares within a table are what to read;
on a busy machine the absolute times include descheduling.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minilora  # noqa: E402
from minilora_bench.models import MASK_PATHS, mask_path  # noqa: E402

TOKENS, R = 1024, 16
WIDTHS = [(576, 576), (576, 1536), (1536, 576)]  # q/k/v/o, gate/up, down


def layers(dropout: float) -> list:
    out = []
    for i, o in WIDTHS:
        layer = minilora.LoRALinear(nn.Linear(i, o, bias=False))
        layer.weight.requires_grad_(False)
        layer.add_adapter("default", R, 2.0 * R, dropout=dropout)
        layer.active_adapter = "default"
        out.append(layer.train())
    return out


def passes(stack: list, inputs: list, count: int) -> None:
    for _ in range(count):
        for layer, x in zip(stack, inputs):
            layer(x).sum().backward()


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inputs = [torch.randn(TOKENS, i, requires_grad=True) for i, _ in WIDTHS]
    for title, dropout, path in [(f"dropout 0.05, {p} mask", 0.05, p) for p in MASK_PATHS] + [("dropout 0", 0.0, None)]:
        stack = layers(dropout)
        with mask_path(path):
            passes(stack, inputs, 3)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                passes(stack, inputs, 10)
        print(f"==== {title}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
