"""Many adapters in one batch: every row through its own adapter, in one product per layer.

Each adapted Linear keeps its adapters stacked in slots on its device: ``a`` (slots, in, r) holds
Aᵀ and ``b`` (slots, r, out) holds scale·Bᵀ, ranks zero-padded to the largest. Slot 0 stays zero,
so a row without an adapter gets the base alone (``x Wᵀ + 0``). A batch is one (B,) tensor of
slot indices, and every layer computes, for row i with slot s_i:

    out_i = x_i Wᵀ + (x_i a[s_i]) b[s_i]          (x_i: one token (decode) or T tokens (prefill))

in one batched product over the rows, whichever adapters they use: Punica's BGMV (decode) and a
gathered batched matmul for prefill (which measured faster here than grouping rows into per-adapter
segments, SGMV: docs/inference.md). Shapes depend on the batch size, the slot count and the
largest rank, never on which adapters a batch mixes, so a new mix is new data for the same
compiled graph (torch.compile, XLA). DoRA adapters batch too: their per-feature ``m/n`` rescale is
stacked beside them (1 for plain LoRA and for slot 0).

A bank has ``capacity`` slots, its device budget. The adapters themselves stay where they are
(on the model's device, or on the host after ``AdapterBank.offload``); one enters a slot when a
batch needs it, in place of the least recently used adapter that no batch in flight holds. On
CUDA the copies run on a stream of their own, so loading never waits for a batch in flight and a
batch waits (on the GPU, not the host) only for the copies of its own adapters.

    bank = minilora.AdapterBank(model, capacity=16)
    with torch.inference_mode(), minilora.mixed_batch(model, ["cardiology", None, "oncology"], bank=bank):
        logits = model(ids).logits
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoRALinear
from .weight import linear


class BankFullError(ValueError):
    """A batch needs more adapters at once than the bank has slots free for it."""


class SlotTable:
    """Which adapter sits in which slot (1..capacity), least recently used first, and how many
    batches in flight hold each one. Slot 0 is never handed out: it is "no adapter"."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: a bank needs at least one slot")
        self.capacity = capacity
        self.slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.held: dict[str, int] = {}  # name -> batches in flight using it

    def place(self, names: Sequence[str]) -> tuple[dict[str, int], list[str]]:
        """({name: slot} for the distinct ``names``, the names that must be written into their slot
        now). Each name becomes the most recently used; a name not in a slot takes a free one, else
        the least recently used slot whose adapter neither this batch nor one in flight holds."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.capacity:
            raise BankFullError(f"a batch with {len(wanted)} distinct adapters needs as many slots, and this bank "
                                f"has {self.capacity}; make the bank larger (AdapterBank(model, capacity=...)) or "
                                "split the batch")
        missing = [n for n in wanted if n not in self.slots]
        for name in wanted:
            if name in self.slots:
                self.slots.move_to_end(name)
        free = sorted(set(range(1, self.capacity + 1)) - set(self.slots.values()), reverse=True)
        for name in missing:
            if not free:
                victim = next((v for v in self.slots if v not in wanted and not self.held.get(v)), None)
                if victim is None:
                    raise BankFullError(f"every slot of this bank ({self.capacity}) holds an adapter that this batch "
                                        "or a batch in flight uses; make the bank larger or wait for a batch to end")
                free.append(self.slots.pop(victim))
            self.slots[name] = free.pop()
        return {n: self.slots[n] for n in wanted}, missing

    def hold(self, names: Iterable[str]) -> None:
        for name in names:
            self.held[name] = self.held.get(name, 0) + 1

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            self.held[name] -= 1
            if not self.held[name]:
                del self.held[name]

    def forget(self, name: str) -> None:
        """Free ``name``'s slot (its adapter was deleted or changed): the next batch writes it again."""
        self.slots.pop(name, None)


class _Batch:
    """The batch in flight: each row's slot, (B,) int64 on the device, and on the CPU the
    embedding-bag indices of the decode product for each width the bank's layers read (each
    in_features, and the rank): ``bags[w]`` (B·w,) and ``ends[w]`` (B + 1,), bag i being
    ``bags[w][ends[w][i]:ends[w][i + 1]]``. Kept per batch size and updated in place, so a
    compiled graph sees the same tensors whatever the batch mixes."""

    def __init__(self, rows: int, widths: Iterable[int], device: torch.device, bags: bool):
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.offsets = {w: torch.arange(w, device=device) for w in widths} if bags else {}
        self.bags = {w: torch.zeros(rows * w, dtype=torch.long, device=device) for w in self.offsets}
        self.ends = {w: torch.arange(rows + 1, device=device) * w for w in self.offsets}

    def set(self, slots: torch.Tensor) -> None:
        self.slots.copy_(slots)
        for width, bag in self.bags.items():
            # row i's bag reads rows s_i·width … s_i·width + width − 1 of a layer's table (see _StackedLinear)
            bag.view(-1, width).copy_(self.slots[:, None] * width + self.offsets[width])


class _StackedLinear:
    """One LoRALinear's slots: ``a`` (slots, in, r) = Aᵀ, ``b`` (slots, r, out) = scale·Bᵀ, and for
    DoRA ``ratio`` (slots, out) = m/n (None while no DoRA adapter was written). In the weight's
    (compute) dtype, on its device. Called by LoRALinear.forward while a batch is in flight."""

    def __init__(self, bank: "AdapterBank", layer: LoRALinear, slots: int, rank: int):
        self.bank, self.layer = bank, layer
        dtype, device = layer.weight.dtype, layer.weight.device
        self.a = torch.zeros(slots, layer.in_features, rank, dtype=dtype, device=device)
        self.b = torch.zeros(slots, rank, layer.out_features, dtype=dtype, device=device)
        self.ratio: Optional[torch.Tensor] = None
        if any(hasattr(a, "lora_magnitude_vector") for a in layer.adapters.values()):
            # made now rather than when the first DoRA adapter is written: its first batch would
            # otherwise take another path (one more compile) than the batches before it
            self.ratio = torch.ones(slots, layer.out_features, dtype=dtype, device=device)

    @torch.no_grad()
    def write(self, slot: torch.Tensor, name: str) -> None:
        """Put adapter ``name`` (zeros if this layer has none) into ``slot``, a (1,) long tensor on
        the device (a tensor, not an int: on XLA an int index would compile one graph per slot)."""
        adapter = self.layer.adapters[name] if name in self.layer.adapters else None
        device = self.a.device
        a = torch.zeros(self.a.shape[1:], dtype=self.a.dtype, device=_where(adapter, device))
        b = torch.zeros(self.b.shape[1:], dtype=self.b.dtype, device=a.device)
        if adapter is not None:
            r = adapter.lora_A.shape[0]
            a[:, :r] = adapter.lora_A.t()
            # the scale folded in here (float32) once, rather than multiplied in every forward
            b[:r] = adapter.lora_B.t().float() * adapter.scale.float()
        self.a.index_copy_(0, slot, _to(a, device)[None])
        self.b.index_copy_(0, slot, _to(b, device)[None])
        magnitude = getattr(adapter, "lora_magnitude_vector", None)  # a DoRA adapter (minilora.dora)
        if magnitude is None and self.ratio is None:
            return
        if self.ratio is None:
            self.ratio = torch.ones(self.a.shape[0], self.b.shape[2], dtype=self.a.dtype, device=device)
        ratio = torch.ones(self.b.shape[2], dtype=self.a.dtype, device=_where(adapter, device))
        if magnitude is not None:
            weight = self.layer.weight.to(magnitude.device)
            ratio = (magnitude.float() / adapter.weight_norm(weight)).to(self.a.dtype)
        self.ratio.index_copy_(0, slot, _to(ratio, device)[None])

    def serves(self, layer: nn.Module) -> bool:
        """Whether this forward takes the stacked path: not in training mode (the stacks have no
        dropout), and no gradient wanted for the batch's adapters (the stacks are copies); else
        LoRALinear runs each adapter over its rows, as it trains."""
        if self.bank.batch is None or layer.training:
            return False
        if self.bank.trainable and torch.is_grad_enabled():
            if self.bank.dora:
                raise ValueError("this mixed batch holds a trainable DoRA adapter and autograd is on, but a mixed "
                                 "batch serves DoRA from its stacks only, which carry no gradient; run it under "
                                 "torch.no_grad() (or freeze the adapters), or train DoRA with set_adapter")
            return False
        return True

    def __call__(self, x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, ..., in) -> (B, ..., out) in x's dtype: each row through the adapter of its slot."""
        batch = self.bank.batch
        slots = batch.slots
        rows = slots.shape[0]
        if x.shape[0] != rows:
            raise ValueError(f"mixed batch: {rows} adapter names for {x.shape[0]} rows")
        out = linear(x, weight, bias if self.ratio is None else None)  # (B, ..., out)
        tokens = x.numel() // (rows * x.shape[-1])
        if tokens == 1 and batch.bags:
            # Decode on the CPU: ATen's embedding_bag with per-sample weights is a fused
            # gather-multiply-add, so each row reads its adapter's rows once and no (B, in, r) copy
            # of the gathered adapters is made. Row i's bag sums x_i[k] · a[s_i, k, :] over k.
            width, rank = self.a.shape[1], self.a.shape[2]
            narrow = F.embedding_bag(batch.bags[width], self.a.view(-1, rank), batch.ends[width],
                                     per_sample_weights=x.reshape(-1).to(self.a.dtype), mode="sum",
                                     include_last_offset=True)  # (B, r)
            delta = F.embedding_bag(batch.bags[rank], self.b.view(-1, self.b.shape[2]), batch.ends[rank],
                                    per_sample_weights=narrow.view(-1), mode="sum",
                                    include_last_offset=True)  # (B, out)
        else:
            x3 = x.reshape(rows, tokens, -1).to(self.a.dtype)  # (B, T, in)
            narrow = torch.bmm(x3, self.a.index_select(0, slots))  # (B, T, r)
            delta = torch.bmm(narrow, self.b.index_select(0, slots))  # (B, T, out)
        out = out.add_(delta.view(out.shape).to(out.dtype))  # in place: x Wᵀ is this call's own tensor
        if self.ratio is None:
            return out
        ratio = self.ratio.index_select(0, slots).view(rows, *([1] * (x.dim() - 2)), -1)  # (B, 1.., out)
        out = out * ratio.to(out.dtype)
        return out if bias is None else out + bias


def _where(adapter, device: torch.device) -> torch.device:
    """Where a slot's new contents are assembled: beside the adapter (on the host for an offloaded
    one, so only the finished slot crosses to the device)."""
    return device if adapter is None else adapter.lora_A.device


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the host to CUDA through pinned memory, without blocking the host."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class AdapterBank:
    """Device slots for a model's adapters, filled least-recently-used first; see the module doc.

    Args:
        model: a model with minilora adapters (inject / load_adapter).
        capacity: slots on the device (the device budget, in adapters); default every adapter the
            model has now.
        max_rank: the rank every slot is padded to; default the largest rank on the model now. An
            adapter of a larger rank needs a new bank.

    Embedding adapters and modules_to_save copies are not stacked: in a mixed batch they keep
    running per adapter over their rows (LoRAEmbedding, ModuleToSave).
    """

    def __init__(self, model: nn.Module, capacity: Optional[int] = None, max_rank: Optional[int] = None):
        with _outside_inference_mode():
            self._build(model, capacity, max_rank)

    def _build(self, model: nn.Module, capacity: Optional[int], max_rank: Optional[int]) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if not self.layers:
            raise ValueError("this model has no LoRA Linear layers to stack; add adapters first (minilora.inject or "
                             "minilora.load_adapter)")
        names = list(dict.fromkeys(n for m in self.layers for n in m.adapters))
        ranks = [a.lora_A.shape[0] for m in self.layers for a in m.adapters.values()]
        self.capacity = max(1, len(names)) if capacity is None else capacity
        self.max_rank = max(ranks, default=1) if max_rank is None else max_rank
        if self.max_rank < max(ranks, default=0):
            raise ValueError(f"max_rank={self.max_rank}, but this model holds an adapter of rank {max(ranks)}; "
                             "give max_rank at least the largest rank the bank will serve")
        self.given = (capacity, max_rank)  # the sizes asked for (None: the defaults), kept by for_model
        self.table = SlotTable(self.capacity)
        self.stacks = [_StackedLinear(self, m, self.capacity + 1, self.max_rank) for m in self.layers]
        self.device = self.layers[0].weight.device
        self.widths = sorted({m.in_features for m in self.layers} | {self.max_rank})
        self.batch: Optional[_Batch] = None
        self.trainable = False  # whether an adapter of the batch in flight has trainable parameters
        self.dora = False  # whether the batch in flight holds a DoRA adapter
        self._held: list[str] = []
        self._batches: dict[int, _Batch] = {}
        self._written: dict[str, tuple] = {}  # name -> _record of the adapter in its slot
        self._adapter_dicts = [m._modules["adapters"]._modules for m in self.layers]  # name -> adapter, per layer
        self._ranks: dict[str, tuple] = {}  # name -> (its adapter objects, their rank), as _rank found them
        self._lock = threading.RLock()
        cuda = self.device.type == "cuda"
        self._copies = torch.cuda.Stream(self.device) if cuda else None  # slot writes
        self._written_event = torch.cuda.Event() if cuda else None  # the last slot writes are done
        self._released_event = torch.cuda.Event() if cuda else None  # ended batches' reads are done

    @classmethod
    def for_model(cls, model: nn.Module, bank: Optional["AdapterBank"] = None,
                  layers: Optional[Sequence[LoRALinear]] = None) -> "AdapterBank":
        """``bank`` while it still fits the model: it stacks exactly the model's LoRA Linears
        (``layers``, when the caller has them at hand), and where its sizes were left to the
        defaults, it still has a slot for every adapter and room for every rank. Else a new bank
        with the sizes ``bank`` was given (None: the defaults)."""
        if layers is None:
            layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if bank is None:
            return cls(model)
        if len(layers) == len(bank.layers) and all(a is b for a, b in zip(layers, bank.layers)):
            names = set().union(*bank._adapter_dicts)  # the layers' own dicts: this runs for every batch
            if (bank.given[0] is not None or len(names) <= bank.capacity) and \
                    (bank.given[1] is not None or bank._rank(names) <= bank.max_rank):
                return bank
        return cls(model, *bank.given)

    def _rank(self, names: set) -> int:
        """The largest rank among adapters ``names``, each adapter object's read once."""
        ranks = []
        for name in names:
            adapters = tuple(d.get(name) for d in self._adapter_dicts)
            known = self._ranks.get(name)
            if known is None or any(a is not b for a, b in zip(adapters, known[0])):  # new, or replaced
                known = self._ranks[name] = (adapters, max(a._parameters["lora_A"].shape[0] for a in adapters if a))
            ranks.append(known[1])
        return max(ranks, default=0)

    @property
    def resident(self) -> list[str]:
        """Adapters in a slot now, least recently used first."""
        return list(self.table.slots)

    # -- filling slots -----------------------------------------------------------------------

    def prefetch(self, names: Sequence[str]) -> None:
        """Put ``names`` into slots now (any thread), ahead of the batch that will use them; a batch
        in flight keeps its own adapters, and its rows never see a half-written slot."""
        with self._lock, _outside_inference_mode():
            self._place(names)

    def _place(self, names: Sequence[str]) -> dict[str, int]:
        """{name: slot} for the distinct ``names``, writing those not yet (or no longer) in a slot."""
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            if name in self.table.slots and self._changed(name):
                self.table.forget(name)  # changed since written (trained further, deleted, reloaded)
        for name in wanted:
            if name not in self.table.slots:
                self._check(name)
        where, missing = self.table.place(wanted)
        if missing:
            with self._on_copy_stream():
                for name in missing:
                    slot = torch.tensor([where[name]], device=self.device)
                    for stack in self.stacks:
                        stack.write(slot, name)
                    self._written[name] = self._record(name)
        return where

    def _check(self, name: str) -> None:
        ranks = [m.adapters[name].lora_A.shape[0] for m in self.layers if name in m.adapters]
        if not ranks:
            known = ", ".join(dict.fromkeys(n for m in self.layers for n in m.adapters)) or "(none)"
            raise ValueError(f"unknown adapter {name!r}; the model has: {known}")
        if max(ranks) > self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {max(ranks)}, above this bank's max_rank={self.max_rank}; "
                             "make a bank with a larger max_rank (AdapterBank(model, max_rank=...))")

    @contextlib.contextmanager
    def _on_copy_stream(self):
        if self._copies is None:
            yield
            return
        self._copies.wait_event(self._released_event)  # batches that ended may still read slots on the GPU
        with torch.cuda.stream(self._copies):
            yield
        self._written_event.record(self._copies)

    def _record(self, name: str) -> tuple:
        """What identifies adapter ``name`` as written into its slot: each layer's adapter object
        (None where it has none) and its tensors, their version counters (bumped by every in-place
        change, an optimizer step's too) and whether they train. Read from the modules' own dicts:
        this is checked for every adapter of every batch, where nn.Module's attribute lookup would
        cost more than the check."""
        adapters = tuple(d.get(name) for d in self._adapter_dicts)
        tensors = tuple(t for a in adapters if a is not None for t in (*a._parameters.values(), *a._buffers.values()))
        dora = any(a is not None and "lora_magnitude_vector" in a._parameters for a in adapters)
        return adapters, tensors, _state(tensors), dora

    def _changed(self, name: str) -> bool:
        """Whether adapter ``name`` differs from what its slot holds (see _record)."""
        adapters, tensors, state, _ = self._written[name]
        return (any(d.get(name) is not a for d, a in zip(self._adapter_dicts, adapters))
                or _state(tensors) != state)

    # -- a batch in flight ---------------------------------------------------------------------

    def begin(self, row_adapters: Sequence[Optional[str]]) -> None:
        """Make the model's LoRA Linears serve a batch whose row i uses ``row_adapters[i]`` (None:
        the base alone) until ``end()``."""
        with self._lock, _outside_inference_mode():
            if self.batch is not None:
                raise RuntimeError("a mixed batch is already in flight on this bank; end it first (one batch at a "
                                   "time per model)")
            where = self._place([n for n in row_adapters if n is not None])
            self.table.hold(where)
            self._held = list(where)
            self.trainable = any(t.requires_grad for name in where for t in self._written[name][1])
            self.dora = any(self._written[name][3] for name in where)
            rows = len(row_adapters)
            if rows not in self._batches:
                self._batches[rows] = _Batch(rows, self.widths, self.device, bags=self.device.type == "cpu")
            batch = self._batches[rows]
            batch.set(torch.tensor([0 if n is None else where[n] for n in row_adapters]).to(self.device))
        if self._written_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._written_event)  # on the GPU: the host goes on
        for layer, stack in zip(self.layers, self.stacks):
            if layer.__dict__.get("stacked") is not stack:  # a plain attribute; kept between batches
                layer.stacked = stack
        self.batch = batch

    def end(self) -> None:
        """The batch is over (its layers' stacks stand idle): its adapters may leave their slots again."""
        self.batch = None
        if self._released_event is not None:
            self._released_event.record(torch.cuda.current_stream(self.device))
        with self._lock:
            self.table.release(self._held)
            self._held = []

    # -- where adapters live ---------------------------------------------------------------------

    @torch.no_grad()
    def offload(self, name: str) -> None:
        """Keep adapter ``name`` on the host (pinned where CUDA is present): it then reaches the device
        only in a slot, for the batches that use it. Such an adapter serves mixed batches only; to use
        it alone (set_adapter), move it back with ``restore``."""
        self._move(name, torch.device("cpu"))

    @torch.no_grad()
    def restore(self, name: str) -> None:
        """Bring adapter ``name`` back beside the base weights (undoes ``offload``)."""
        self._move(name, self.device)

    def _move(self, name: str, device: torch.device) -> None:
        pin = device.type == "cpu" and torch.cuda.is_available()
        for layer in self.layers:
            if name in layer.adapters:
                for t in list(layer.adapters[name].parameters()) + list(layer.adapters[name].buffers()):
                    moved = t.data.to(device)
                    t.data = moved.pin_memory() if pin and not moved.is_pinned() else moved


@contextlib.contextmanager
def _outside_inference_mode():
    """The bank's tensors are made and written as ordinary tensors without autograd history, even
    when a batch begins inside ``torch.inference_mode()``: inference tensors could not be updated
    in place afterwards, outside it."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _state(tensors: Sequence[torch.Tensor]) -> tuple:
    """Each tensor's version counter and requires_grad flag."""
    try:
        return tuple((t._version, t.requires_grad) for t in tensors)
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) keeps no version counter
        return tuple((None, t.requires_grad) for t in tensors)
