"""Everything that differs between XLA, CUDA and CPU lives here; the loop never asks which.

On XLA the loop's code is traced lazily and cut into graphs at every ``sync()``; shapes and
Python values that stay the same from step to step let XLA reuse its compiled graphs.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Iterable, Iterator

import torch

from . import distributed
from .config import UsageError


def move_model(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model.to(device)`` that keeps tied weights tied.

    Moving between CPU and an XLA device cannot swap a parameter's storage in place, so
    ``Module.to`` gives every module its own new Parameter: the input embedding and the LM head of
    a tied model (Llama-3.2-1B, the demo's base) become two tensors, the optimizer trains them
    apart and ``save_pretrained`` writes both. Re-tying after the move restores the one matrix.
    """
    model.to(device)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


class Device:
    """One accelerator (or the CPU), chosen by ``--device``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._masks: dict = {}
        if kind == "xla":
            import torch_xla

            self.torch_device = torch_xla.device()
        elif kind == "cuda":
            self.torch_device = torch.device("cuda")
        else:
            self.torch_device = torch.device("cpu")

    @classmethod
    def choose(cls, requested: str = "auto") -> "Device":
        return cls(cls.resolve(requested))

    @staticmethod
    def resolve(requested: str = "auto") -> str:
        """The kind ``--device`` names, without starting it. auto: XLA whenever torch_xla is
        installed (TPU if present, else its CPU device), else CUDA, else CPU."""
        has_xla = importlib.util.find_spec("torch_xla") is not None
        if requested == "auto":
            requested = "xla" if has_xla else "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "xla" and not has_xla:
            raise UsageError("--device xla needs torch_xla: pip install 'minilora[xla]' (Linux x86_64)")
        if requested == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible to torch")
        return requested

    @property
    def is_xla(self) -> bool:
        return self.kind == "xla"

    def describe(self) -> str:
        if self.is_xla:
            import torch_xla.runtime as xr

            return f"xla ({xr.device_type()}, {xr.global_runtime_device_count()} device(s))"
        if self.kind == "cuda":
            return f"cuda ({torch.cuda.get_device_name()})"
        return f"cpu ({torch.get_num_threads()} threads)"

    # -- data ------------------------------------------------------------------------------

    def loader(self, batches: Iterable) -> Iterator:
        """Batches moved to the device. On XLA a background thread prefetches them and each
        batch boundary is a graph cut (``sync``), so every step runs as one compiled graph.
        With several processes each moves only its rows; under SPMD the rows are split
        across devices (distributed.py)."""
        batches = distributed.process_rows(batches)
        if self.is_xla:
            import torch_xla.distributed.parallel_loader as pl

            return iter(pl.MpDeviceLoader(_Reiterable(batches), self.torch_device,
                                          input_sharding=distributed.input_sharding()))
        return (tuple(t.to(self.torch_device, non_blocking=True) for t in batch) for batch in batches)

    def attention_mask(self, model, ids: torch.Tensor):
        """On XLA, an explicit (1, 1, L, L) causal mask, built once per length and dtype.

        Without it transformers inspects position_ids for packed sequences with a host read in
        every forward (masking_utils.find_packed_sequence_indices), which splits the graph.
        Eager devices get None and keep SDPA's fused causal path."""
        if not self.is_xla:
            return None
        length = ids.shape[1]
        sdpa = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
        dtype = next(model.parameters()).dtype
        key = (length, sdpa, dtype)
        if key not in self._masks:
            allowed = torch.ones(length, length, dtype=torch.bool).tril()
            mask = allowed if sdpa else torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            self._masks[key] = mask[None, None].to(self.torch_device)
        return self._masks[key]

    def tensor(self, value, dtype=torch.float32) -> torch.Tensor:
        """A (1,)-shaped tensor holding ``value`` as device *data*. On XLA a 0-dim transfer of
        0 or 1 becomes a constant baked into the graph (a "special scalar"), so resetting an
        accumulator to 0 would give the next step a new graph and a new compile."""
        return torch.tensor([value], dtype=dtype).to(self.torch_device)

    def sync(self) -> None:
        """Cut and run the pending graph (XLA); nothing elsewhere."""
        if self.is_xla:
            import torch_xla

            torch_xla.sync()

    def wait(self) -> None:
        """Block until queued device work is finished (for timing)."""
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            torch_xla_sync = self.sync
            torch_xla_sync()
            xm.wait_device_ops()
        elif self.kind == "cuda":
            torch.cuda.synchronize()

    # -- optimisation ----------------------------------------------------------------------

    def optimizer(self, groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW. On XLA and CUDA it is ``capturable``: step counts and bias corrections stay
        on the device, so a step reads nothing back to the host; the learning rate is a
        device tensor updated in place."""
        if self.kind == "cpu":  # fused: one kernel over all parameters, not ~10 ops for each adapter matrix
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
        for group in groups:
            group["lr"] = torch.tensor(lr).to(self.torch_device)
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=weight_decay, capturable=True, foreach=False)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """``optimizer.load_state_dict``, with the learning rate kept in this device's tensor.
        The checkpoint's is a host tensor; left in place, every step would upload it and build
        a graph unlike an unresumed run's, which the persistent compilation cache then misses."""
        lrs = [group["lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(state)
        for group, lr in zip(optimizer.param_groups, lrs):
            if isinstance(lr, torch.Tensor):
                lr.copy_(torch.as_tensor(group["lr"], dtype=lr.dtype))
                group["lr"] = lr

    def set_lr(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].copy_(torch.tensor(lr, dtype=group["lr"].dtype))  # host -> device data, no recompile
            else:
                group["lr"] = lr

    # -- memory and checkpointing ----------------------------------------------------------

    def enable_gradient_checkpointing(self, model) -> None:
        """Recompute each decoder layer in the backward pass. On XLA, torch_xla's checkpoint
        wraps the recomputation in an optimization barrier; plain torch checkpointing would be
        undone by XLA's common-subexpression elimination."""
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.is_xla:
            from torch_xla.utils.checkpoint import checkpoint

            model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=functools.partial(
                checkpoint, use_reentrant=True))

    def peak_memory_bytes(self) -> int | None:
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            try:
                info = xm.get_memory_info(self.torch_device)
                return int(info.get("peak_bytes_used", 0)) or None
            except Exception:
                return None
        return None

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.kind == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            seed = xm.get_rng_state()  # a uint64 (SPMD's often needs all 64 bits): stored as int64 bits
            state["xla"] = torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if self.kind == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        if self.is_xla and "xla" in state:
            import torch_xla.core.xla_model as xm

            xm.set_rng_state(int(state["xla"]) % 2**64)

    def compile_count(self) -> int:
        """XLA graph compilations so far in this process (0 elsewhere)."""
        if not self.is_xla:
            return 0
        import torch_xla.debug.metrics as met

        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def host_fallbacks(self) -> dict[str, int]:
        """XLA ops that ran on the host (``aten::*`` counters), e.g. ``aten::_local_scalar_dense``
        for every ``.item()``."""
        if not self.is_xla:
            return {}
        import torch_xla.debug.metrics as met

        return {name: met.counter_value(name) for name in met.counter_names() if name.startswith("aten::")}



class _Reiterable:
    """MpDeviceLoader wants something it can call iter() on once; a generator is fine."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches) if hasattr(self.batches, "__len__") else 0
