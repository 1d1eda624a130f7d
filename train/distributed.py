"""Scaling out on engines that already exist: XLA's SPMD partitioner, and torch.distributed.

``setup`` picks one layout per run, a ``Layout``; ``minilora_train.device.Device`` holds it and the loop
reaches it only through the device. Its methods do nothing in the single-device layout:

    single  one device, one process.
    spmd    XLA with more than one device (or --spmd): one process per host and a 1-D mesh
            ('fsdp',) over every device of every host. Each global batch is split across the
            devices along its batch axis, and every weight, frozen base and adapter alike, is
            sharded along its largest dimension FSDPv2-style: decoder layers are wrapped, so
            XLA gathers one layer's weights at a time and a model larger than one chip fits.
    ddp     torchrun (WORLD_SIZE > 1): one process per GPU, or per CPU slot with gloo.
            DistributedDataParallel reduces the adapter's gradients only (frozen weights are
            not registered with it and not in the optimizer); every rank takes its own rows of
            each global batch and draws its own dropout masks. The ranks agree, once per
            update, on whether to stop (SIGTERM), so that they all stop after the same update.
            With --fsdp, FSDP2 (``fully_shard``) instead of DDP: every weight, frozen base
            included, is split across the ranks, one decoder layer gathered at a time.

In all three a micro-batch holds ``per_device_train_batch_size x data-parallel ways`` rows
(``global_batch``), drawn from one shuffled order that every process computes alike, and the
loss is divided by the token count of the whole global update. A run on N devices therefore
takes the same optimizer steps as one device given the N-times larger batch.

Multi-process ``torch_xla.launch`` (one process per device with XLA collectives) is not a
layout here: SPMD replaces it on TPUs, and its collectives hang on XLA's CPU client, so it
could not be tested.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .config import UsageError

BATCH_AXIS = "fsdp"  # the mesh's only axis: data and weights are both sharded along it


def setup(args, kind: str) -> "Layout":
    """The layout for ``args`` on a device of ``kind`` (xla, cuda, cpu), with what it needs
    started: XLA's persistent compilation cache, SPMD and its mesh, or the torch.distributed
    process group. Call it before the device is first used: SPMD started after
    ``torch_xla.device()`` crashes later. Safe to call again in the same process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = getattr(args, "fsdp", False)
    if fsdp and kind == "xla":
        raise UsageError("--fsdp is for torchrun (CUDA, or CPU with gloo); on XLA, SPMD already shards every "
                         "weight FSDPv2-style: drop --fsdp")
    if fsdp and getattr(args, "resume_from_checkpoint", None):
        raise UsageError("--resume_from_checkpoint does not work with --fsdp yet (restoring into sharded "
                         "parameters and optimizer state is not implemented): start the run again, or train "
                         "without --fsdp if the model fits one device")
    if fsdp and world == 1:
        raise UsageError("--fsdp shards the model across torchrun's processes, and this run has one: launch it "
                         "with torchrun --nproc_per_node N, or drop --fsdp")
    if kind == "xla":
        if world > 1:
            raise UsageError(f"{world} processes were launched (torchrun?) but the device is XLA: on TPUs run one "
                             "process per host (the same command on every worker; SPMD spans the devices); "
                             "on GPUs pass --device cuda")
        if args.xla_cache_dir:
            _start_cache(args.xla_cache_dir)
        import torch_xla.runtime as xr

        return _start_spmd() if args.spmd or xr.global_runtime_device_count() > 1 else Layout()
    for flag, value in (("--spmd", args.spmd), ("--xla_cache_dir", args.xla_cache_dir)):
        if value:
            raise UsageError(f"{flag} applies to XLA only, and this run's device is {kind}; "
                             "pass --device xla, or drop the flag (GPUs scale out with torchrun)")
    layout = _start_process_group(kind) if world > 1 else Layout()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda" if kind == "cuda" else "cpu", (layout.ways,))
        layout = dataclasses.replace(layout, fsdp=True, mesh=mesh)
    return layout


def _start_cache(path: str) -> None:
    import torch_xla
    import torch_xla.runtime as xr

    if torch_xla._XLAC._xla_computation_cache_is_initialized():
        if os.environ.get("XLA_PERSISTENT_CACHE_PATH") == path:
            return  # a second run in this process, with the same cache
        raise UsageError(f"--xla_cache_dir {path}: this process already compiled XLA graphs without that cache; "
                         "the cache must be set before the first compilation (start a new process)")
    os.makedirs(path, exist_ok=True)
    xr.initialize_cache(path, readonly=False)


def _start_spmd() -> "Layout":
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    xr.use_spmd()
    devices = xr.global_runtime_device_count()
    mesh = xs.Mesh(np.arange(devices), (devices,), (BATCH_AXIS,))
    xs.set_global_mesh(mesh)
    return Layout("spmd", ways=devices, processes=xr.process_count(), index=xr.process_index(), mesh=mesh)


def _start_process_group(kind: str) -> "Layout":
    import torch.distributed as dist

    if not dist.is_initialized():
        if kind == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # Device's "cuda" is now this GPU
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        _started_here.append(dist.group.WORLD)
        atexit.register(_destroy_if_alive)  # after an error; a run that ends normally calls finish()
    host_group = _gloo_group() if kind == "cuda" else None
    return Layout("ddp", ways=dist.get_world_size(), processes=dist.get_world_size(), index=dist.get_rank(),
                  host_group=host_group)


_started_here: list = []  # the default group, when _start_process_group initialised it


def finish() -> None:
    """End the process group that ``setup`` started, once every rank has got here. The command
    line calls this after a run that ended normally (finished, or stopped together on SIGTERM);
    a run that failed leaves it to the exit handler.

    The barrier first: a rank that tore its group down while another still waited on it, or an
    interpreter that exits with gloo's worker threads still alive, aborts at exit ("terminate
    called without an active exception") although the run itself completed. A group that the
    caller started itself is left alone."""
    import gc

    import torch.distributed as dist

    if not (_started_here and dist.is_initialized() and dist.group.WORLD is _started_here[0]):
        return
    gc.collect()  # the run's DDP wrapper (its reducer holds the group) goes now, not at interpreter exit
    dist.barrier()
    _destroy_if_alive()


def _destroy_if_alive() -> None:
    import torch.distributed as dist

    if _started_here and dist.is_initialized() and dist.group.WORLD is _started_here[0]:
        dist.destroy_process_group()
        _gloo_group.cache_clear()
    _started_here.clear()


@functools.lru_cache(maxsize=None)
def _gloo_group():
    """One gloo group beside NCCL per process: creating it is a collective, which every rank
    reaches at the same ``setup`` call; a second run in the process reuses it."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


@dataclass(frozen=True)
class Layout:
    """How one run spreads over devices and processes (``setup`` makes it)."""

    kind: str = "single"   # single | spmd | ddp
    ways: int = 1          # data-parallel ways: devices (spmd) or processes (ddp)
    processes: int = 1     # processes that load data: hosts (spmd) or ranks (ddp)
    index: int = 0         # this process among them
    mesh: Any = None       # spmd: the xs.Mesh; ddp with fsdp: a 1-D DeviceMesh over the ranks
    fsdp: bool = False     # ddp: FSDP2 instead of DistributedDataParallel (--fsdp)
    # ddp on GPUs: the gloo group that carries host-side values (the stop flag, RNG states), so
    # that reading them back never waits for the GPU. None: the default group (gloo on the CPU).
    host_group: Any = None

    def describe(self) -> Optional[str]:
        """One line on the layout for the run's console header; None when single."""
        if self.kind == "spmd":
            return (f"SPMD over {self.ways} device(s) on {self.processes} host(s), FSDPv2 "
                    f"(global batch = per-device batch x {self.ways})")
        if self.fsdp:
            return (f"FSDP2 over {self.ways} process(es), every weight sharded "
                    f"(global batch = per-device batch x {self.ways})")
        if self.kind == "ddp":
            return f"DDP over {self.ways} process(es) (global batch = per-device batch x {self.ways})"
        return None

    # -- who does what -------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        """The one process that prints, writes files and talks to wandb (rank 0, or host 0)."""
        return self.index == 0

    def global_batch(self, per_device: int) -> int:
        """Rows in one micro-batch across all devices: per-device rows x data-parallel ways."""
        return per_device * self.ways

    def process_rows(self, batches: Iterable[tuple]) -> Iterable[tuple]:
        """This process's rows of each global batch: the i-th of ``processes`` equal blocks of
        every (rows, L) tensor; 1-D tensors (per-batch values such as a token count) pass whole.
        Under single-host SPMD the one process keeps everything and XLA splits it across devices."""
        if self.processes == 1:
            return batches
        n, i = self.processes, self.index

        def rows(t: torch.Tensor) -> torch.Tensor:
            if t.dim() < 2:
                return t
            per = t.shape[0] // n
            return t[i * per:(i + 1) * per]

        return (tuple(rows(t) for t in batch) for batch in batches)

    def input_sharding(self):
        """SPMD: how MpDeviceLoader places each (rows, L) batch: split along rows over the mesh;
        with several hosts each feeds only its own rows (``minibatch``). None elsewhere."""
        if self.kind != "spmd":
            return None
        import torch_xla.distributed.spmd as xs

        return xs.ShardingSpec(self.mesh, (BATCH_AXIS, None), minibatch=self.processes > 1)

    def seed_per_rank(self, seed: int) -> None:
        """DDP: give each rank its own training random numbers (the dropout masks of its rows):
        rank r > 0 reseeds with ``seed + r``; rank 0 keeps the stream one process would have.
        Call once the model and adapter are built (alike on every rank, from ``seed``) and before
        a resume restores the ranks' states. Elsewhere nothing: one process draws the masks of
        all its rows (under SPMD, XLA's generator, for every device)."""
        if self.kind == "ddp" and self.index > 0:
            torch.manual_seed(seed + self.index)

    def any_process(self, flag: bool) -> bool:
        """DDP: whether ``flag`` is set on any rank, by a one-element all-reduce (MAX) of a host
        tensor (gloo, also beside NCCL: no GPU sync). Every rank must call it at the same point
        of the loop. Elsewhere ``flag`` itself: no collective and no host read (XLA, SPMD hosts)."""
        if self.kind != "ddp":
            return flag
        import torch.distributed as dist

        votes = torch.tensor([int(flag)])
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(votes.item())  # a host tensor: no device sync

    def gather_on_main(self, value) -> Optional[list]:
        """DDP: every rank's ``value`` (tensors in nested dicts, say an RNG state), in rank order,
        on rank 0, and None on the others; a collective, every rank calls it. Elsewhere
        ``[value]``: one process, or SPMD hosts that share one RNG state."""
        if self.kind != "ddp":
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.ways if self.is_main else None
        dist.gather_object(value, gathered, dst=0, group=self.host_group)
        return gathered

    def own_entry(self, per_rank: list):
        """This process's entry of a list ``gather_on_main`` made: rank r's under DDP, the one
        entry elsewhere. None when the list comes from a different number of ranks (a run
        resumed with another ``--nproc_per_node``)."""
        ranks = self.ways if self.kind == "ddp" else 1
        if len(per_rank) != ranks:
            return None
        return per_rank[self.index if self.kind == "ddp" else 0]

    # -- the model -----------------------------------------------------------------------------

    def shard(self, model: nn.Module) -> nn.Module:
        """torchrun --fsdp: FSDP2, ``fully_shard`` on each decoder layer, then on the root (the
        embeddings, final norm and LM head). Each parameter becomes a DTensor holding this rank's
        shard, moved to the device as it is sharded (a base larger than one GPU never sits whole
        on one), so call it after LoRA injection and gradient checkpointing and before the
        optimizer is built: an optimizer built earlier would hold the replaced, unsharded
        tensors. The model keeps its module names. Elsewhere the model itself."""
        if not self.fsdp:
            return model
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        # Sum, not average, as DDP's _sum_gradients: each rank's loss is already divided by the
        # token count of the global update. Both settings are per FSDP module, so set them on each;
        # the plain SUM op, since a factor alone asks for PREMUL_SUM, which gloo does not have.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model

    def wrap(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> nn.Module:
        """SPMD: FSDPv2 over the decoder layers and the rest; DDP: DistributedDataParallel that
        sums adapter gradients. Call after gradient checkpointing is set up and the model is on
        its device, and before the first forward. The optimizer may already hold the parameters
        (they stay the same objects) and state restored from a checkpoint; SPMD shards that state
        like its parameter, as an unresumed run's first update does (same memory per device, same
        graphs)."""
        if self.kind == "spmd":
            wrapped = self._fsdp_v2(model)
            if optimizer is not None:
                self._shard_like_parameters(optimizer)
            return wrapped
        if self.kind == "ddp" and not self.fsdp:  # --fsdp: ``shard`` did it, before the optimizer
            return _ddp(model)
        return model

    def _fsdp_v2(self, model: nn.Module) -> nn.Module:
        import torch_xla
        import torch_xla.distributed.spmd as xs
        from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy
        from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

        # A tensor copied in from a checkpoint arrives marked replicated, and FSDPv2 leaves marked
        # parameters alone: unmarked, a resumed run shards its restored weights like a fresh one.
        for p in model.parameters():
            if torch_xla._XLAC._get_xla_sharding_spec(p):
                xs.clear_sharding(p)
        # transformers names the classes it never splits across devices: the decoder layers.
        layers = {type(m) for m in _decoder_layers(model)}
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers) if layers else None
        wrapped = SpmdFullyShardedDataParallel(model, mesh=self.mesh, shard_output=_shard_batch_axis,
                                               auto_wrap_policy=policy)
        self._shard_quantized_codes(model)
        return wrapped

    def _shard_quantized_codes(self, model: nn.Module) -> None:
        """--quantize: FSDPv2 shards parameters only, and a quantized base is buffers (codes and
        scales): shard each along its first axis too, so that every device holds 1/N of the 4-bit
        base, gathered layer by layer as the float weights are."""
        import torch_xla.distributed.spmd as xs
        from minilora.quant import QuantizedWeight

        for module in model.modules():
            if isinstance(module, QuantizedWeight):
                for name, buf in module.named_buffers(recurse=False):
                    if name in ("codes", "absmax") and buf.shape[0] % self.ways == 0:
                        xs.mark_sharding(buf, self.mesh, (BATCH_AXIS,) + (None,) * (buf.dim() - 1))

    def _shard_like_parameters(self, optimizer: torch.optim.Optimizer) -> None:
        import torch_xla
        import torch_xla.distributed.spmd as xs

        for param, state in optimizer.state.items():
            for tensor in state.values():
                if isinstance(tensor, torch.Tensor) and tensor.shape == param.shape and tensor.dim():
                    if torch_xla._XLAC._get_xla_sharding_spec(tensor):
                        xs.clear_sharding(tensor)
                    spec = [None] * tensor.dim()
                    spec[list(tensor.shape).index(max(tensor.shape))] = BATCH_AXIS  # FSDPv2's choice for the parameter
                    xs.mark_sharding(tensor, self.mesh, tuple(spec))

    # -- one update ----------------------------------------------------------------------------

    def no_backward_sync(self, model: nn.Module, enabled: bool):
        """Context for one micro-batch's forward and backward. DDP: while ``enabled`` (every
        micro-batch of an update but the last) gradients accumulate locally (``no_sync``); the
        last one reduces them. FSDP2 likewise, through a setting rather than a context: set on
        every micro-batch, so the last one turns it back on."""
        if self.fsdp:
            model.set_requires_gradient_sync(not enabled)
            return contextlib.nullcontext()
        if self.kind == "ddp" and enabled:
            return model.no_sync()
        return contextlib.nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """DDP: the sum of ``tensor`` over ranks (each rank summed its own rows). Under SPMD a
        value is already global; single: itself."""
        if self.kind != "ddp":
            return tensor
        import torch.distributed as dist

        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    def unshard(self, value):
        """--fsdp: a DTensor (a parameter's shard, its optimizer state, a norm over sharded
        gradients) gathered whole with ``full_tensor()``, a collective every rank must call.
        Anything else, and every value elsewhere: itself."""
        if not self.fsdp:
            return value
        from torch.distributed.tensor import DTensor

        return value.full_tensor() if isinstance(value, DTensor) else value

    # -- saving --------------------------------------------------------------------------------

    def for_saving(self, model: nn.Module) -> nn.Module:
        """The model under its own module names ('model.layers.0.self_attn.q_proj', never
        'module.…' or '_orig_module.…': adapters saved from a wrapped model would carry the
        wrapper's prefixes and load elsewhere as missing keys), with trainable parameters copied
        to host memory under SPMD, and gathered whole (``full_tensor``) under --fsdp; the frozen
        base stays sharded. A view: modules on the way to a change are shallow copies, the model
        itself is left as it is. Call it on every process: gathering sharded tensors is a
        computation on all devices (a collective); only then may the main process alone write."""
        host = {}
        if self.fsdp:
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():  # the root keeps its weights gathered after a forward: shards again
                if isinstance(module, FSDPModule):
                    module.reshard()
            host = {id(p): nn.Parameter(self.unshard(p), requires_grad=True)
                    for p in model.parameters() if p.requires_grad}
        if self.kind == "spmd":
            trainable = [p for p in model.parameters() if p.requires_grad]
            host = {id(p): nn.Parameter(c, requires_grad=True) for p, c in zip(trainable, self.to_host(trainable))}
        return self._view(model, self._wrapper_types(), host)

    def to_host(self, tree):
        """Tensors anywhere in nested dicts, lists and tuples (a state dict, an optimizer's) as CPU
        copies. Under SPMD every sharded tensor gets a replicated copy in one graph, compiled once
        for all saves; gathering each tensor on its own would compile a program per tensor, per
        save. Under --fsdp every DTensor (an optimizer state's shard) is gathered whole: a
        collective, in the same order on every rank."""
        from torch.utils._pytree import tree_flatten, tree_unflatten

        leaves, spec = tree_flatten(tree)
        if self.fsdp:
            leaves = [self.unshard(t) for t in leaves]
        if self.kind == "spmd":
            import torch_xla
            import torch_xla.distributed.spmd as xs

            on_device = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.device.type == "xla"]
            for i in on_device:
                copy_ = leaves[i].detach() * 1  # a new value: a clone would alias the sharded data and its annotation
                if copy_.dim():
                    xs.mark_sharding(copy_, self.mesh, (None,) * copy_.dim())  # replicated
                leaves[i] = copy_
            torch_xla.sync()
        leaves = [t.detach().to("cpu") if isinstance(t, torch.Tensor) else t for t in leaves]
        return tree_unflatten(leaves, spec)

    def _wrapper_types(self) -> tuple:
        from torch.nn.parallel import DistributedDataParallel

        types = [DistributedDataParallel]
        if self.kind == "spmd":
            from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

            types.append(SpmdFullyShardedDataParallel)
        return tuple(types)

    def _view(self, module: nn.Module, wrappers: tuple, host: dict) -> nn.Module:
        """``module`` with wrappers skipped and parameters replaced per ``host`` (id -> Parameter);
        only the modules that change are copied."""
        while isinstance(module, wrappers):
            module = module.module
        children = {name: None if child is None else self._view(child, wrappers, host)
                    for name, child in module._modules.items()}
        params = {name: host.get(id(p), p) for name, p in module._parameters.items()}
        if all(children[n] is c for n, c in module._modules.items()) and all(
                params[n] is p for n, p in module._parameters.items()):
            return module
        view = object.__new__(self._unsharded_class(type(module)))  # a shallow copy, as copy.copy would make
        view.__dict__.update(module.__dict__)
        view.__dict__["_modules"] = children
        view.__dict__["_parameters"] = params
        return view

    def _unsharded_class(self, cls: type) -> type:
        """The model's own class for FSDP2's ``FSDP<Name>`` subclass of it: a view (its parameters
        gathered whole) is a plain module; FSDP2's methods on it (``to`` reshards) would look for
        the sharding state of a module that has none."""
        if self.fsdp:
            from torch.distributed.fsdp import FSDPModule

            if issubclass(cls, FSDPModule):
                return next(base for base in cls.__bases__ if base is not FSDPModule)
        return cls


# -- wrappers that need no layout ------------------------------------------------------------------

def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules transformers never splits across devices (``_no_split_modules``): the decoder
    layers, which FSDPv2 and FSDP2 each wrap on their own."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _shard_batch_axis(output, mesh) -> None:
    """Each wrapped module's output (a decoder layer's hidden states (B, L, H), the model's
    logits (B, L, V)) stays split along the batch axis, which is what makes XLA's
    partitioner run FSDP (gather weights, keep activations local) rather than replicate."""
    import torch_xla.distributed.spmd as xs

    tensor = getattr(output, "logits", None)
    if tensor is None:
        tensor = output[0] if isinstance(output, tuple) else output
    xs.mark_sharding(tensor, mesh, (BATCH_AXIS,) + (None,) * (tensor.dim() - 1))


def _ddp(model: nn.Module) -> nn.Module:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # Every rank loaded the same base from the same files with the same seed, so only the
    # trainable tensors are made identical here; DDP's own start-up sync would send the whole
    # frozen base from rank 0 as well.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p, src=0)
    on_gpu = next(model.parameters()).is_cuda
    ddp = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if on_gpu else None,
                                  broadcast_buffers=False, init_sync=False)
    ddp.register_comm_hook(None, _sum_gradients)
    return ddp


def _sum_gradients(state, bucket):
    """DDP comm hook: sum, not average. Each rank's loss is already divided by the token count
    of the global update, so the ranks' gradients add up to the single-process gradient."""
    import torch.distributed as dist

    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])
