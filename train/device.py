"""Where and how a run computes: the accelerator (XLA, CUDA or CPU) and the layout over
devices and processes (``minilora_train.distributed``). Everything that differs between them sits behind
one ``Device``; the loop never asks which device or layout it runs on.

On XLA the loop's code is traced lazily and cut into graphs at every ``sync()``; shapes and
Python values that stay the same from step to step let XLA reuse its compiled graphs.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

from . import distributed
from .config import UsageError
from .distributed import Layout


def resolve(requested: str = "auto", *, auto_picks_xla: bool = True) -> str:
    """The device ``requested`` names (xla, cuda, cuda:1, cpu …), without starting it. auto: a
    TPU through XLA when one is present, else CUDA, else the eager CPU; with
    ``auto_picks_xla=False`` (inference: generation recompiles on XLA as the sequence grows)
    CUDA, else CPU. XLA's CPU device only when asked for (``xla``): it runs the loop several
    times slower than eager (docs/benchmarks.md), a development target."""
    has_xla = importlib.util.find_spec("torch_xla") is not None
    if requested == "auto":
        requested = ("xla" if will_use_xla(auto_picks_xla=auto_picks_xla)
                     else "cuda" if torch.cuda.is_available() else "cpu")
    kind = requested.split(":")[0]
    if kind == "xla" and not has_xla:
        raise UsageError("--device xla needs torch_xla: pip install 'minilora[xla]' (Linux x86_64)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: no CUDA GPU is visible to torch")
    return requested


def will_use_xla(requested: str = "auto", *, auto_picks_xla: bool = True) -> bool:
    """Whether ``resolve(requested)`` picks XLA, decided without importing torch_xla or
    checking that the device exists (``resolve`` does that)."""
    if requested == "auto":
        return auto_picks_xla and importlib.util.find_spec("torch_xla") is not None and tpu_present()
    return requested.split(":")[0] == "xla"


# Google's PCI vendor id and its TPU chips' device ids, as torch_xla._internal.tpu lists them
# (v2/v3, v4, v5e, v6e, two test parts, 7x). Google's gVNIC shares the vendor id, hence the list.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x005e", "0x0063", "0x006f", "0x0056", "0x0062", "0x0076"}


def tpu_present(pci_devices: str = "/sys/bus/pci/devices") -> bool:
    """A TPU for XLA to run on: ``PJRT_DEVICE=TPU``, or a TPU chip on the PCI bus. Read from /sys
    the way torch_xla does, without importing it: the import costs seconds and logs a warning on
    a machine with no TPU, where the run then never uses XLA."""
    if os.environ.get("PJRT_DEVICE", "").upper() == "TPU":
        return True
    for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device")) as f:
                if f.read().strip() in _TPU_PCI_DEVICES:
                    return True
        except OSError:  # a device that went away while listing, or an unreadable entry
            continue
    return False


def cpu_has_native_bf16(cpuinfo: Optional[str] = None) -> bool:
    """True when the CPU multiplies bfloat16 in hardware: AVX-512-BF16 (AMD Zen 4 on, Intel Cooper
    Lake on) or AMX (Intel Sapphire Rapids on), as /proc/cpuinfo's flags say. Elsewhere bfloat16 is
    emulated and slower than float32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False  # not Linux: no way to tell, and float32 is never wrong
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def native_bf16(requested: str = "auto") -> bool:
    """Whether the device ``resolve(requested)`` picks computes bfloat16 natively: TPUs (XLA), CUDA
    GPUs that support it, CPUs with native bfloat16 (cpu_has_native_bf16). The demo's base takes
    bfloat16 there and float32 elsewhere."""
    kind = resolve(requested).split(":")[0]
    if kind == "xla":
        return True
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def torch_device(name: str) -> torch.device:
    """The torch.device for a name ``resolve`` returned (``xla``: torch_xla's device)."""
    if name == "xla":
        import torch_xla

        return torch_xla.device()
    return torch.device(name)


def inference_device(requested: Union[str, torch.device, None] = None) -> torch.device:
    """Where generation and evaluation run: ``requested`` (cpu, cuda, cuda:1, xla …) as ``resolve``
    checks it; by default CUDA when present, else the CPU. XLA only when named: generation
    recompiles there as the sequence grows."""
    if isinstance(requested, torch.device):
        return requested
    return torch_device(resolve(requested or "auto", auto_picks_xla=False))


def generation_device_after(trained_on: str) -> torch.device:
    """Where a run that trained on ``trained_on`` (its --device) generates afterwards: the same
    device, except XLA, where inference_device's default takes over (see there)."""
    return inference_device(None if will_use_xla(trained_on) else trained_on)


def use_torch_layers(model: torch.nn.Module) -> None:
    """Undo transformers' Hub kernels (transformers >= 5.25 with the ``kernels`` package) on a
    model that is still where it was loaded, and keep them off.

    ``from_pretrained`` kernelizes every model by default, and each later ``train()``/``eval()``
    kernelizes it again for the device it is on then. On XLA that raises (``kernels`` knows no
    'xla' device); on CUDA it swaps RMSNorm and RoPE for code downloaded from the Hub at that
    moment, which an offline machine cannot fetch and which makes a GPU run compute other
    numbers than the same run on the CPU. The app runs transformers' own torch layers everywhere.
    Resetting kernelizes once more with an empty mapping, so it must happen before the model
    moves to a device ``kernels`` refuses. Older transformers have no such state: nothing to do.
    """
    if getattr(model, "use_kernels", False) and hasattr(model, "set_use_kernels"):
        model.set_use_kernels(False)


def move_model(model: torch.nn.Module, device: Union[str, torch.device]) -> torch.nn.Module:
    """``model.to(device)`` that keeps tied weights tied.

    Moving between CPU and an XLA device cannot swap a parameter's storage in place, so
    ``Module.to`` gives every module its own new Parameter: the input embedding and the LM head of
    a tied model (Llama-3.2-1B, the demo's base) become two tensors, the optimizer trains them
    apart and ``save_pretrained`` writes both. Re-tying after the move restores the one matrix.
    """
    use_torch_layers(model)
    model.to(device)
    config = getattr(model, "config", None)
    # A table quantized with minilora.quantize(..., embeddings=True) is one module of buffers that
    # the embedding and the head both hold: ``.to`` moves it once and it stays shared, and
    # transformers' tie_weights, which looks for a Parameter there, would fail on it.
    from minilora.quant import QuantizedWeight

    try:
        quantized_table = isinstance(getattr(model.get_input_embeddings(), "weight", None), QuantizedWeight)
    except (AttributeError, NotImplementedError):  # no get_input_embeddings: nothing of ours to keep
        quantized_table = False
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights") and not quantized_table:
        model.tie_weights()
    return model


class Device:
    """One accelerator (or the CPU), chosen by ``--device``, and the layout of the run over
    devices and processes. ``Device.start(args)`` makes the one a run uses."""

    def __init__(self, kind: str, layout: Optional[Layout] = None):
        self.kind = kind
        self.layout = layout or Layout()
        self.torch_device = torch_device(kind)
        self._masks: dict = {}
        self._warm: Optional[tuple[int, dict]] = None  # XLA: (compiles, host fallbacks) once warm
        self._compiled_at: Optional[float] = None  # --compile: when torch.compile was set up
        self._compile_warm: Optional[tuple[int, float]] = None  # (graphs compiled, seconds) once warm

    @classmethod
    def start(cls, args) -> "Device":
        """The device ``args.device`` names, with the layout ``args`` asks for started (XLA's
        cache, SPMD or a process group) before XLA hands out its device."""
        kind = resolve(args.device)
        return cls(kind, distributed.setup(args, kind))

    @property
    def is_xla(self) -> bool:
        return self.kind == "xla"

    @property
    def is_main(self) -> bool:
        """The one process that prints, writes files and talks to wandb."""
        return self.layout.is_main

    def describe(self) -> str:
        if self.is_xla:
            import torch_xla.runtime as xr

            return f"xla ({xr.device_type()}, {xr.global_runtime_device_count()} device(s))"
        if self.kind == "cuda":
            return f"cuda ({torch.cuda.get_device_name()})"
        return f"cpu ({torch.get_num_threads()} threads)"

    # -- the model -------------------------------------------------------------------------

    def place(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        """The model on this device, in training mode. torchrun --fsdp: sharded by FSDP2 first,
        each layer moved as it is sharded, so a base larger than one GPU never sits whole on
        one; the optimizer built afterwards holds the shards. Call after LoRA injection.

        ``gradient_checkpointing``: recompute each decoder layer in the backward pass, set up
        before sharding. On XLA, torch_xla's checkpoint wraps the recomputation in an optimization
        barrier; plain torch checkpointing would be undone by XLA's common-subexpression
        elimination."""
        if gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.is_xla:
                from torch_xla.utils.checkpoint import checkpoint

                model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=functools.partial(
                    checkpoint, use_reentrant=True))
        model = self.layout.shard(model)
        return move_model(model, self.torch_device).train()

    # -- the optimizer and a resumed run's state -------------------------------------------

    def optimizer(self, groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW. On XLA and CUDA it is ``capturable``: step counts and bias corrections stay
        on the device, so a step reads nothing back to the host; the learning rate is a
        device tensor updated in place."""
        if self.kind == "cpu":  # fused: one kernel over all parameters, not ~10 ops for each adapter matrix
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
        for group in groups:
            group["lr"] = torch.tensor(lr).to(self.torch_device)
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=weight_decay, capturable=True, foreach=False)

    def seed_per_rank(self, seed: int) -> None:
        """torchrun: each rank draws its own dropout masks (distributed.Layout.seed_per_rank)."""
        self.layout.seed_per_rank(seed)

    def restore(self, optimizer: torch.optim.Optimizer, optimizer_state: dict, per_rank: list) -> bool:
        """A resumed run's state: ``optimizer.load_state_dict``, then this process's entry of what
        ``rng_states`` saved. False when the RNG states were saved by a different number of
        processes: the optimizer is restored, the random-number state is left as it is.

        The learning rate stays in this device's tensor. The checkpoint's is a host tensor; left in
        place, every step would upload it and build a graph unlike an unresumed run's, which the
        persistent compilation cache then misses."""
        lrs = [group["lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(optimizer_state)
        for group, lr in zip(optimizer.param_groups, lrs):
            if isinstance(lr, torch.Tensor):
                lr.copy_(torch.as_tensor(group["lr"], dtype=lr.dtype))
                group["lr"] = lr
        state = self.layout.own_entry(per_rank)
        if state is None:
            return False
        torch.set_rng_state(state["torch"])
        if self.kind == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        if self.is_xla and "xla" in state:
            import torch_xla.core.xla_model as xm

            xm.set_rng_state(int(state["xla"]) % 2**64)
        return True

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """SPMD: FSDPv2; torchrun: DDP (--fsdp: sharded by ``place``); else the model itself.
        After the optimizer and any restored state, before the first forward."""
        return self.layout.wrap(model, optimizer)

    # -- data ------------------------------------------------------------------------------

    def global_batch(self, per_device: int) -> int:
        """Rows in one micro-batch across all devices: per-device rows x data-parallel ways."""
        return self.layout.global_batch(per_device)

    def loader(self, batches: Iterable) -> Iterator:
        """Batches moved to the device. On XLA a background thread prefetches them and each
        batch boundary is a graph cut (``sync``), so every step runs as one compiled graph.
        With several processes each moves only its rows; under SPMD the rows are split
        across devices (distributed.py)."""
        batches = self.layout.process_rows(batches)
        if self.is_xla:
            import torch_xla.distributed.parallel_loader as pl

            return iter(pl.MpDeviceLoader(_Reiterable(batches), self.torch_device,
                                          input_sharding=self.layout.input_sharding()))
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

    # -- one update ------------------------------------------------------------------------

    def no_backward_sync(self, model: torch.nn.Module, enabled: bool):
        """Context for one micro-batch's forward and backward: while ``enabled`` (every
        micro-batch of an update but its last) DDP and FSDP2 keep gradients local; the last one
        reduces them across processes. Elsewhere nothing."""
        return self.layout.no_backward_sync(model, enabled)

    def release_freed_host_memory(self) -> None:
        """With ``MINILORA_MALLOC_TRIM=1``, after each optimizer update on the CPU: glibc's
        ``malloc_trim(0)``, which hands the free pages inside the heap back to the kernel.

        An update's activations are freed by its end, but glibc raises its mmap threshold to the
        largest block freed so far (up to 32 MiB), so from the second update on every activation
        is carved from the heap, where freed blocks stay resident and, fragmented anew in every
        update, raise the app's peak above a bare loop's. Trimming returns them, but the next
        update faults in again the pages it reuses, which costs time, so it is a memory-for-time
        trade the user chooses (docs/benchmarks.md, "Where the app's extra memory went"). Nothing
        on XLA and CUDA (activations are not in the host heap) or where the C library is not
        glibc."""
        if self.kind == "cpu" and _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)

    def set_lr(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].copy_(torch.tensor(lr, dtype=group["lr"].dtype))  # host -> device data, no recompile
            else:
                group["lr"] = lr

    def grad_norm(self, params: list, max_norm: float) -> torch.Tensor:
        """The gradients' total norm (0-dim, on the device), clipped to ``max_norm`` first when
        it is > 0. --fsdp: the norm of sharded gradients, gathered whole on every rank."""
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return self.layout.unshard(norm)

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes that each summed their own rows (torchrun);
        elsewhere itself: one process, or SPMD, where every value is already global."""
        return self.layout.all_reduce_sum(tensor)

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is set in any process (torchrun: a tiny host-side all-reduce that
        every process must reach at the same point; elsewhere ``flag`` itself, no host read)."""
        return self.layout.any_process(flag)

    # -- saving ----------------------------------------------------------------------------

    def for_saving(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model unwrapped, its trainable tensors whole and on the host (a collective when
        sharded: every process calls it, then the main process alone writes)."""
        return self.layout.for_saving(model)

    def to_host(self, tree):
        """Tensors in nested containers (an optimizer state) as whole CPU copies; a collective
        when sharded."""
        return self.layout.to_host(tree)

    def rng_states(self) -> Optional[list]:
        """Every process's random-number state (torch, CUDA, XLA), in rank order, on the main
        process; None on the others. A collective under torchrun: every process calls it."""
        state = {"torch": torch.get_rng_state()}
        if self.kind == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            seed = xm.get_rng_state()  # a uint64 (SPMD's often needs all 64 bits): stored as int64 bits
            state["xla"] = torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)
        return self.layout.gather_on_main(state)

    # -- measurements ----------------------------------------------------------------------

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

    def mark_warm(self) -> None:
        """The loop has run each of its graphs once: compiles and host fallbacks from here on are
        counted by ``xla_counts`` (on XLA; nothing elsewhere)."""
        if self.is_xla:
            self._warm = (_xla_compiles(), _xla_host_fallbacks())
        if self._compiled_at is not None:
            self._compile_warm = (_dynamo_graphs(), time.time() - self._compiled_at)

    def compile(self, module: torch.nn.Module) -> None:
        """--compile on CUDA and CPU: torch.compile ``module``'s forward in place (its parameters
        and state-dict keys stay as they are); backward runs through the compiled graph too. XLA
        compiles its graphs anyway."""
        if not self.is_xla:
            module.compile()
            self._compiled_at = time.time()

    def compile_counts(self) -> dict:
        """--compile: graphs TorchDynamo compiled until ``mark_warm`` and after it, and the seconds
        from setting up the compile to ``mark_warm`` (the base evaluation and the first updates,
        their compiles included); {} without --compile."""
        if self._compiled_at is None:
            return {}
        during, seconds = self._compile_warm or (_dynamo_graphs(), time.time() - self._compiled_at)
        return {"warmup_seconds": seconds, "compiles_during_warmup": during,
                "compiles_after_warmup": _dynamo_graphs() - during}

    def xla_counts(self) -> dict:
        """XLA: graph compilations in this process, and those and the host fallbacks since
        ``mark_warm`` (a correct loop has none but the host reads it asks for); {} elsewhere."""
        if not self.is_xla:
            return {}
        compiles, fallbacks = self._warm or (0, {})
        now = _xla_host_fallbacks()
        return {"compiles_total": _xla_compiles(), "compiles_after_warmup": _xla_compiles() - compiles,
                "host_fallbacks_after_warmup": {k: v - fallbacks.get(k, 0) for k, v in now.items()
                                                if v - fallbacks.get(k, 0)}}



def _glibc_malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim`` where ``MINILORA_MALLOC_TRIM=1`` asks for it (see
    Device.release_freed_host_memory); None otherwise, and where the C library is another (musl,
    macOS, Windows)."""
    if not sys.platform.startswith("linux") or os.environ.get("MINILORA_MALLOC_TRIM", "0") != "1":
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # glibc's own symbol: musl has malloc but no such function
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _glibc_malloc_trim()


class _Reiterable:
    """MpDeviceLoader wants something it can call iter() on once; a generator is fine."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches) if hasattr(self.batches, "__len__") else 0


def _xla_compiles() -> int:
    """XLA graph compilations so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def _xla_host_fallbacks() -> dict[str, int]:
    """XLA ops that ran on the host (``aten::*`` counters), e.g. ``aten::_local_scalar_dense``
    for every ``.item()``."""
    import torch_xla.debug.metrics as met

    return {name: met.counter_value(name) for name in met.counter_names() if name.startswith("aten::")}


def _dynamo_graphs() -> int:
    """Graphs torch.compile (TorchDynamo) has compiled so far in this process."""
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
