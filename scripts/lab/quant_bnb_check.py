"""Compare minilora's NF4 quantization with bitsandbytes' ``quantize_4bit`` on the same weights.

    pip install bitsandbytes   # not a minilora dependency: only this check needs it
    python scripts/lab/quant_bnb_check.py --device cpu  --out docs/measurements/quant-bnb-cpu.json
    python scripts/lab/quant_bnb_check.py --device cuda --out docs/measurements/quant-bnb-cuda.json

For each weight (bf16, fp16 and fp32; even and odd element counts; block sizes 32, 64, 128), with
and without double quantization: whether the packed 4-bit codes, the block scales (8-bit codes
with double quantization, else float32), the second-level scales and the offset are identical,
and whether minilora's dequantization equals bitsandbytes' ``dequantize_4bit`` (the CPU backend's
C++ kernel rounds bf16/fp16 outputs its own way; its torch backend is compared as well where it
can be imported). Where 8-bit scale codes differ, the script reports how far each side's code is
from the exact value (float64), to tell rounding ties from a layout mistake.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from minilora.weight import NF4_CODE, SCALE_BLOCK, QuantizedWeight, dynamic_code

CASES = [((256, 320), torch.bfloat16, 64), ((33, 67), torch.float32, 64), ((2048, 130), torch.float16, 64),
         ((96, 200), torch.bfloat16, 128), ((5, 7), torch.float32, 32), ((1024, 576), torch.bfloat16, 64)]


def compare(shape, dtype, blocksize, device, double_quant) -> dict:
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype).to(device)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    ours = QuantizedWeight(w, "nf4", blocksize=blocksize, double_quant=double_quant)
    row = {"shape": list(shape), "dtype": str(dtype), "blocksize": blocksize, "double_quant": double_quant,
           "codes_identical": torch.equal(packed.view(-1), ours.codes),
           "code_book_identical": torch.equal(state.code.float().cpu(), torch.tensor(NF4_CODE))}
    differing = (state.absmax != ours.absmax).nonzero().flatten()
    row["block_scales_differing"] = f"{len(differing)} of {ours.absmax.numel()}"
    if double_quant:
        row["second_level_identical"] = torch.equal(state.state2.absmax, ours.absmax_scale)
        row["offset_identical"] = torch.equal(state.offset.reshape(1), ours.absmax_offset)
        row["dynamic_code_identical"] = torch.equal(state.state2.code.cpu(), dynamic_code())
        exact = _scaled_block_absmax(w, blocksize, state)
        code = dynamic_code().double()
        row["scale_code_distances"] = [
            {"block": i, "exact": exact[i].item(), "bitsandbytes": abs(exact[i] - code[state.absmax[i].long()]).item(),
             "minilora": abs(exact[i] - code[ours.absmax[i].long()]).item()} for i in differing[:5].tolist()]
    row["dequantized_identical_to_dequantize_4bit"] = torch.equal(bnbf.dequantize_4bit(packed, state), ours.dequantize())
    try:  # the torch backend's dequantization, fed our codes and scales
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        ref = _dequantize_4bit_compute(ours.codes, ours.block_absmax(), torch.tensor(NF4_CODE, device=w.device),
                                       blocksize, ours.shape, dtype)
        row["dequantized_identical_to_torch_backend"] = torch.equal(ref, ours.dequantize())
    except ImportError:
        pass
    return row


def _scaled_block_absmax(w, blocksize, state) -> torch.Tensor:
    """Each block's (absmax - offset) / second-level scale in float64: what the 8-bit code rounds."""
    flat = w.double().reshape(-1).cpu()
    blocks = -(-flat.numel() // blocksize)
    flat = torch.nn.functional.pad(flat, (0, blocks * blocksize - flat.numel()))
    absmax = flat.view(blocks, blocksize).abs().amax(1)
    second = state.state2.absmax.double().cpu().repeat_interleave(SCALE_BLOCK)[:blocks]
    return (absmax - state.offset.double().cpu()) / second


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import bitsandbytes

    rows = [compare(shape, dtype, bs, args.device, dq) for shape, dtype, bs in CASES for dq in (True, False)]
    result = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__, "device": args.device, "cases": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
