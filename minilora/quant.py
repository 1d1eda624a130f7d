"""A frozen base in 4 or 8 bits: ``quantize(model)`` puts quantized weights into a model, and
``dequantize(model)`` takes them out again (the weight type itself is minilora.weight's).

    minilora.quantize(model, "nf4")   # every Linear but the LM head: 4-bit codes, blockwise scales
    minilora.quantize(model, "nf4", embeddings=True)   # the token embedding too (and a head tied to it)
    minilora.inject(model, r=16)      # adapters over the quantized Linears, as over plain ones
    ...train...                       # the base is dequantized one layer at a time, in forward and backward
    minilora.save_adapter(model, "out/")  # an ordinary adapter: it loads on the bf16 base too
"""

from __future__ import annotations

from torch import nn

from .adapters import adapter_names, adapter_state
from .config import LoRAConfig, inside_adapters, matches
from .dora import DoRAAdapter
from .embedding import LoRAEmbedding
from .inject import find_targets, replace_module
from .layer import LoRALinear
from .modules_to_save import ModuleToSave
from .trainers import install, uninstall
from .weight import (TILE_ELEMENTS, QuantEmbedding, QuantizedBaseError, QuantizedWeight, QuantLinear, as_parameter,
                     check_scheme)

# -- whole models ----------------------------------------------------------------------------------

def quantize(model: nn.Module, scheme: str = "nf4", *, target_modules="all-linear", exclude_modules=None,
             embeddings: bool = False, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Store the frozen weights of the selected Linears quantized, in place; returns ``model``.

    ``target_modules`` and ``exclude_modules`` select as in LoRAConfig: ``"all-linear"`` (the
    default) is every Linear but the output head (QLoRA's choice: the head's errors go straight
    into the logits). Each layer is quantized on its own, a tile at a time, so the float32 working
    copy is at most TILE_ELEMENTS elements. Linears that already carry an adapter (inject before
    quantize) get their base quantized in place. Nothing changes if any selected layer cannot be
    quantized.

    ``embeddings=True`` quantizes every nn.Embedding too (a Llama has one: the token embedding;
    ``exclude_modules`` leaves any out), and with it an output head tied to one: the head then holds
    the very same QuantizedWeight, so the table is stored once, as in the float model. Off by
    default, as in QLoRA: the embedding and the head stay in the compute dtype. An untied head is
    quantized only if ``target_modules`` names it.

    Quantized weights do not train; adapters over them do (``inject`` after or before).
    Raises QuantizedBaseError for a module quantize cannot store (see its message), ValueError for
    an unknown scheme or block size.
    """
    check_scheme(scheme, blocksize)
    for flag, value in (("embeddings", embeddings), ("double_quant", double_quant)):
        if not isinstance(value, bool):  # a string such as "false" would be truthy
            raise ValueError(f"{flag}={value!r}: give True or False")
    config = LoRAConfig(target_modules=target_modules, exclude_modules=exclude_modules)
    targets = find_targets(model, config)
    holders = weight_holders(model)
    tables = []  # (name, embedding module, [(name, module) of the Linears tied to it])
    if embeddings:
        for name, module in model.named_modules():
            if not name or inside_adapters(name) or (exclude_modules is not None and matches(exclude_modules, name)):
                continue
            if isinstance(module, ModuleToSave) and isinstance(module.original, nn.Embedding):
                raise QuantizedBaseError(
                    f"{name} is trained in full (modules_to_save), so its table cannot be stored quantized; "
                    f"quantize before inject and adapt it with LoRA (target_modules=[..., {name.rpartition('.')[2]!r}]), "
                    "or leave it out (exclude_modules)")
            if not isinstance(module, (nn.Embedding, LoRAEmbedding)):
                continue
            _check_table(name, module)
            _check_finite(name, module.weight)
            tied = [(n, m) for n, m, _ in holders.get(id(module.weight), []) if m is not module]
            for tied_name, holder, attr in holders[id(module.weight)]:
                if holder is not module and (attr != "weight" or not isinstance(holder, (nn.Linear, LoRALinear))
                                             or isinstance(holder, ModuleToSave)):
                    raise QuantizedBaseError(
                        f"{name}'s table is shared with {tied_name}.{attr}, in a {type(holder).__name__}, which cannot "
                        "hold a quantized table (trained in full?); leave the embedding out (exclude_modules)")
            tables.append((name, module, tied))
        if not tables:
            raise ValueError("embeddings=True, but no nn.Embedding is left to quantize"
                             + (f" (exclude_modules={exclude_modules!r})" if exclude_modules is not None else "")
                             + "; drop embeddings=True")
    tables_ids = {id(m) for _, m, _ in tables} | {id(m) for _, _, tied in tables for _, m in tied}
    targets = [(n, m) for n, m in targets if id(m) not in tables_ids]  # quantized with their table
    for name, module in targets:
        weight = module.weight
        if isinstance(weight, QuantizedWeight):
            raise ValueError(f"{name} is already quantized ({weight.scheme}); quantize a model once "
                             "(minilora.dequantize(model) gives the plain Linears back)")
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise QuantizedBaseError(f"{name} is a {type(module).__name__}; quantize stores Linear weights (and with "
                                     "embeddings=True, nn.Embedding tables) only")
        if isinstance(module, LoRALinear) and module.merged:
            raise QuantizedBaseError(f"{name} has a merged adapter; call minilora.unmerge(model) before quantizing")
        dora = [n for n, a in getattr(module, "adapters", {}).items() if isinstance(a, DoRAAdapter)]
        if dora:  # as inject refuses DoRA over a quantized base, for the same reason
            raise QuantizedBaseError(f"{name} holds the DoRA adapter {dora[0]!r}, whose magnitude needs the weight's "
                                     "row norms in every forward, so its base cannot be quantized; use plain LoRA over "
                                     "a quantized base, or keep the base in float for DoRA")
        if not weight.is_floating_point():
            raise ValueError(f"{name}: cannot quantize a {weight.dtype} weight; quantize a floating-point model")
        _check_finite(name, weight)
        others = [f"{n}.{attr}" for n, m, attr in holders.get(id(weight), []) if m is not module]
        if others:
            raise QuantizedBaseError(
                f"{name}'s weight is shared with {others[0]} (tied embeddings?); quantizing it alone would untie "
                "them and store it twice: pass embeddings=True to store the shared table once, quantized, or "
                "exclude it")
    for name, module, tied in tables:
        quantized = QuantizedWeight(module.weight, scheme, blocksize, double_quant)
        _hold(model, name, module, quantized)
        for tied_name, holder in tied:
            _hold(model, tied_name, holder, quantized)
    for name, module in targets:
        _hold(model, name, module, QuantizedWeight(module.weight, scheme, blocksize, double_quant))
    adapter_state(model).layers = None  # LoRA layers may have been swapped
    # transformers' own save_pretrained would write the codes, which from_pretrained does not read
    # (it would initialise every quantized Linear at random): minilora's writes adapters, or refuses.
    install(model)
    return model


def _check_finite(name: str, weight) -> None:
    """Raise unless every value of ``weight`` is finite, counted a tile at a time (no weight-sized
    mask). An inf makes its block's absmax inf, so the block dequantizes to NaN and 0; double
    quantization subtracts the mean of all block absmaxes, which spreads it to every block."""
    flat = weight.detach().reshape(-1)
    if flat.is_meta:  # shapes only (sizing a model): no values to check
        return
    bad = sum(int((~flat[i:i + TILE_ELEMENTS].isfinite()).sum()) for i in range(0, flat.numel(), TILE_ELEMENTS))
    if bad:
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf) of {flat.numel()}; quantized, they "
                         "would spread over their block of weights (with double quantization, over the whole "
                         "weight); the base is damaged: reload it from its files")


def _check_table(name: str, module: nn.Module) -> None:
    """Raise unless ``module`` (nn.Embedding or LoRAEmbedding) can have its table quantized."""
    if isinstance(module.weight, QuantizedWeight):
        raise ValueError(f"{name} is already quantized ({module.weight.scheme}); quantize a model once "
                         "(minilora.dequantize(model) gives the plain modules back)")
    if type(module) is not nn.Embedding and isinstance(module, nn.Embedding):
        raise QuantizedBaseError(f"{name} is a {type(module).__name__}, a subclass of nn.Embedding whose lookup may "
                                 "differ (e.g. scaled); embeddings=True quantizes plain nn.Embedding only, so leave it "
                                 "out (exclude_modules)")
    if module.max_norm is not None:
        raise QuantizedBaseError(f"{name} renormalises its rows on lookup (max_norm={module.max_norm}), which rewrites "
                                 "the table; a quantized table cannot be rewritten, so leave it out (exclude_modules)")
    if getattr(module, "merged", False):
        raise QuantizedBaseError(f"{name} has a merged adapter; call minilora.unmerge(model) before quantizing")
    if not module.weight.is_floating_point():
        raise ValueError(f"{name}: cannot quantize a {module.weight.dtype} table; quantize a floating-point model")
    if module.weight.numel() == 0:
        raise ValueError(f"{name} has a table of shape {tuple(module.weight.shape)}, with no elements: there is "
                         "nothing to quantize; leave it out (exclude_modules)")


def _hold(model: nn.Module, name: str, module: nn.Module, weight: QuantizedWeight) -> None:
    """Make the module called ``name`` compute with ``weight``: a LoRA layer keeps its adapters and
    takes the quantized weight in place of its Parameter; a plain Linear or Embedding is replaced
    by a QuantLinear or QuantEmbedding."""
    if isinstance(module, nn.Embedding):
        replace_module(model, name, QuantEmbedding(weight, module.padding_idx).train(module.training))
    elif isinstance(module, nn.Linear):
        replace_module(model, name, QuantLinear(weight, module.bias).train(module.training))
    else:  # LoRALinear, LoRAEmbedding
        del module.weight  # the Parameter; a module of buffers takes its name
        module.weight = weight


def weight_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(tensor) -> [(module name, module, attribute)] of every module holding that Parameter, or
    that QuantizedWeight as its ``weight``: two or more entries for tied weights."""
    holders: dict[int, list] = {}
    for name, module in model.named_modules():
        held = [(attr, p) for attr, p in module._parameters.items() if p is not None]
        if isinstance(module._modules.get("weight"), QuantizedWeight):
            held.append(("weight", module._modules["weight"]))
        for attr, tensor in held:
            holders.setdefault(id(tensor), []).append((name, module, attr))
    return holders


def dequantize(model: nn.Module) -> nn.Module:
    """Put plain weights back, in the compute dtype: QuantLinear -> nn.Linear, QuantEmbedding ->
    nn.Embedding, and a LoRA layer's quantized base -> a frozen Parameter (its adapters stay). A
    table shared by an embedding and a head becomes one Parameter shared by both. The weights are
    what forward used, not the original ones: quantization's rounding stays. Returns ``model``."""
    dense: dict[int, nn.Parameter] = {}  # id(QuantizedWeight) -> its Parameter: a shared table once
    for name, module in list(model.named_modules()):
        weight = module._modules.get("weight")
        if not isinstance(weight, QuantizedWeight):
            continue
        param = dense.get(id(weight))
        if param is None:
            param = dense[id(weight)] = as_parameter(weight)
        if isinstance(module, QuantLinear):
            replace_module(model, name, module.to_linear(param))
        elif isinstance(module, QuantEmbedding):
            replace_module(model, name, module.to_embedding(param))
        else:  # LoRALinear, LoRAEmbedding
            del module.weight
            module.weight = param
    adapter_state(model).layers = None  # LoRA layers may have been swapped
    if not adapter_names(model):  # quantize installed it; with adapters it writes them, as after inject
        uninstall(model)
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedWeight]]:
    """(name of the module, its QuantizedWeight) for every quantized weight (a shared one once)."""
    return [(name.rpartition(".")[0], m) for name, m in model.named_modules() if isinstance(m, QuantizedWeight)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: parameters (tied ones once) and quantized codes
    and scales (a shared table once; code books excluded: constants, not saved)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(w.nbytes() for _, w in quantized_layers(model))
