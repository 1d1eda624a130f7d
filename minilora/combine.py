"""Combining trained adapters into a new one, as PEFT's ``add_weighted_adapter`` does.

    minilora.add_weighted_adapter(model, ["cardiology", "oncology"], [0.7, 0.3], "cardio_onco",
                                  combination_type="svd", svd_rank=16)
    minilora.set_adapter(model, "cardio_onco")
    minilora.save_adapter(model, "out/cardio_onco", adapter_name="cardio_onco")

Per adapted layer, with weights wᵢ, scalings sᵢ and deltas ΔWᵢ = sᵢ·BᵢAᵢ (PEFT's definitions):

    linear  A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ,  B = Σ √|wᵢsᵢ|·Bᵢ   (equal ranks; B·A is *not* Σ wᵢΔWᵢ,
            the cross terms BᵢAⱼ remain: cheap, and only an approximation)
    cat     A = [w₁s₁A₁; w₂s₂A₂; …],  B = [B₁ B₂ …]          (rank Σ rᵢ; B·A = Σ wᵢΔWᵢ exactly)
    svd     B·A = the best rank-``svd_rank`` approximation of Σ wᵢΔWᵢ (B = U·S, A = Vᵀ),
            entries optionally clamped at the ``svd_clamp`` quantile of |U·S| and |Vᵀ|

and the sparsifying variants of ``linear`` (on A and B) and ``svd`` (on the deltas), which first
keep a fraction ``density`` of each tensor's entries:

    magnitude_prune(_svd)  the largest |entries|, then the weighted sum
    ties(_svd)             the largest |entries|; then per entry only the tensors whose sign agrees
                           with the elected sign (of the sum, or the most frequent), averaged (TIES)
    dare_linear(_svd)      random entries, rescaled by 1/density (DARE), then the weighted sum
    dare_ties(_svd)        random entries as DARE, then TIES' sign election and average

The new adapter has scaling 1 (lora_alpha = r), takes its other settings (dropout, bias, …)
from the first adapter, is added frozen and inactive (``set_adapter`` selects it), and saves
and loads like any other adapter.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import nn

from .adapters import adapted_layers, adapter_names, config_of, lora_modules, lora_parameters
from .dora import DoRAAdapter
from .inject import check_adapter_name, find_targets, inject

# Combined on A and B separately (equal ranks), on the deltas then SVD, or concatenated.
_ON_A_AND_B = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_ON_DELTAS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("svd", "linear", "cat") + _ON_A_AND_B[1:] + _ON_DELTAS[1:]


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total") -> nn.Module:
    """Add adapter ``adapter_name`` combining ``adapters`` with ``weights`` (module doc), in place.

    Args, as PEFT's ``LoraModel.add_weighted_adapter``:
        adapters / weights: names of existing adapters and one weight each (negative subtracts).
        combination_type: ``svd`` (PEFT's default), ``linear``, ``cat``, ``ties``, ``ties_svd``,
            ``dare_linear``, ``dare_linear_svd``, ``dare_ties``, ``dare_ties_svd``,
            ``magnitude_prune``, ``magnitude_prune_svd``; the types without ``_svd`` (but ``cat``)
            need equal ranks. With a single adapter PEFT always uses ``linear``, and so does this.
        svd_rank: rank of the ``*svd`` result; None means the largest rank among ``adapters``.
        svd_clamp: a quantile in [0, 1]; U·S and Vᵀ are clamped to ± that quantile of their entries.
        svd_full_matrices / svd_driver: passed to ``torch.linalg.svd`` (the driver is CUDA-only).
        density: for the ties, dare and magnitude_prune types, the fraction of entries kept, in
            (0, 1]. dare draws from torch's global generator: seed it for a reproducible result.
        majority_sign_method: ties' sign election, ``total`` (sign of the sum) or ``frequency``.

    Unlike PEFT, a name already taken raises instead of returning silently; DoRA adapters are
    refused (PEFT keeps their A and B but resets the magnitude, so the result is neither adapter).
    Raises ValueError before anything on the model changes. Returns ``model``.
    """
    adapters, weights = list(adapters), list(weights)
    combination_type = _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                                        density, majority_sign_method)
    configs = [config_of(model, name) for name in adapters]
    with_copies = [a for a, c in zip(adapters, configs) if c.modules_to_save]
    if with_copies:  # PEFT would give the new adapter fresh copies of the base modules, silently untrained
        raise ValueError(f"adapter {with_copies[0]!r} has modules_to_save (modules trained in full), which have no "
                         "weighted combination; combine adapters without modules_to_save")
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]  # PEFT: the largest rank each adapter may have
    if combination_type in _ON_A_AND_B:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={combination_type!r} needs adapters of one rank, got r={ranks}; use "
                             "'cat' (exact, rank = the sum) or an '*svd' type for adapters of different ranks")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    # Every layer holding any of the adapters, and the new A (r, in) and B (out, r) for it, all
    # computed before the model changes.
    combined = {}
    for name, layer in lora_modules(model):
        present = [(layer.adapters[a], w) for a, w in zip(adapters, weights) if a in layer.adapters]
        if present:
            lora_A, lora_B = _combine(name, layer, present, combination_type, new_rank, svd_clamp,
                                      svd_full_matrices, svd_driver, density, majority_sign_method)
            _check_finite(name, weights, lora_A, lora_B, lora_B @ lora_A)  # B·A: the delta forward applies
            combined[name] = lora_A, lora_B
    config = _combined_config(model, configs, combined, new_rank)

    previous = {layer: layer.active_adapter for layer in adapted_layers(model)}
    trainable = {param: param.requires_grad for param in model.parameters()}
    inject(model, config, adapter_name=adapter_name)
    with torch.no_grad():
        for name, (lora_A, lora_B) in combined.items():
            adapter = model.get_submodule(name).adapters[adapter_name]
            adapter.lora_A.copy_(lora_A)
            adapter.lora_B.copy_(lora_B)
    # As PEFT: the new adapter is frozen and inactive; what was active and trainable stays so.
    for layer in adapted_layers(model):
        layer.active_adapter = previous.get(layer)
    for param, flag in trainable.items():
        param.requires_grad_(flag)
    for _, param in lora_parameters(model, adapter_name):
        param.requires_grad_(False)
    return model


def _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
                     majority_sign_method) -> str:
    check_adapter_name(adapter_name)
    known = adapter_names(model)
    if adapter_name in known:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pick another adapter_name "
                         f"or call minilora.delete_adapter(model, {adapter_name!r}) first")
    if not adapters:
        raise ValueError("adapters is empty; name the adapters to combine, e.g. ['cardiology', 'oncology']")
    unknown = [a for a in adapters if a not in known]
    if unknown:
        raise ValueError(f"unknown adapter {unknown[0]!r}; the model has: {', '.join(known) or '(no adapters)'}")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weight {w!r} is not a finite number; weights are floats such as 0.5 or -1.0")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r}; use one of {', '.join(COMBINATION_TYPES)}")
    sparsifying = combination_type.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if sparsifying and (isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1):
        raise ValueError(f"combination_type={combination_type!r} keeps a fraction density of each tensor's entries; "
                         f"give density in (0, 1] such as 0.5, not {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={majority_sign_method!r}: use 'total' or 'frequency'")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank={svd_rank!r}: give a positive integer rank, or None for the largest input rank")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 <= svd_clamp <= 1):
        raise ValueError(f"svd_clamp={svd_clamp!r}: give a quantile in [0, 1] such as 0.99, or None for no clamping")
    for name, layer in lora_modules(model):
        if layer.merged:
            raise ValueError(f"adapter {layer.merged_adapter!r} is merged into the weights; call "
                             "minilora.unmerge(model) before combining adapters")
        dora = [a for a in adapters if isinstance(layer.adapters[a] if a in layer.adapters else None, DoRAAdapter)]
        if dora:
            raise ValueError(f"adapter {dora[0]!r} is a DoRA adapter; its per-feature magnitude rescales the whole "
                             "layer and has no weighted sum with other adapters, so only plain LoRA adapters combine")
    return "linear" if len(adapters) == 1 else combination_type  # as PEFT


def _combine(name, layer, present, combination_type, new_rank, svd_clamp, full_matrices, driver, density,
             majority_sign_method):
    """(A (new_rank or the layer's rank, in), B (out, same)) float32 for one layer (module doc)."""
    if combination_type in _ON_A_AND_B:
        shapes = {a.r for a, _ in present}
        if len(shapes) != 1:
            raise ValueError(f"combination_type={combination_type!r} needs the adapters to share a rank in every "
                             f"layer, but {name} has ranks {sorted(shapes)}; use 'cat' or an '*svd' type")
        # √|w·s| on each side, the sign on A's only (on both it would cancel)
        signed = [w * a.scaling for a, w in present]
        weights_A = torch.tensor([math.copysign(math.sqrt(abs(ws)), ws) for ws in signed])
        weights_B = torch.tensor([math.sqrt(abs(ws)) for ws in signed])
        lora_A = _weighted_sum([a.lora_A.detach().float() for a, _ in present], weights_A, combination_type,
                               density, majority_sign_method)
        lora_B = _weighted_sum([a.lora_B.detach().float() for a, _ in present], weights_B, combination_type,
                               density, majority_sign_method)
        return lora_A, lora_B
    if combination_type == "cat":
        lora_A = torch.cat([a.lora_A.detach().float() * w * a.scaling for a, w in present], dim=0)
        lora_B = torch.cat([a.lora_B.detach().float() for a, _ in present], dim=1)
        pad = new_rank - lora_A.shape[0]  # PEFT gives every layer the summed maximum rank; zeros fill the rest
        return (torch.cat([lora_A, lora_A.new_zeros(pad, lora_A.shape[1])]),
                torch.cat([lora_B, lora_B.new_zeros(lora_B.shape[0], pad)], dim=1))
    out_features, in_features = present[0][0].lora_B.shape[0], present[0][0].lora_A.shape[1]  # embeddings too
    if new_rank > min(out_features, in_features):
        raise ValueError(f"svd_rank={new_rank} exceeds the rank {min(out_features, in_features)} an "
                         f"({out_features}, {in_features}) layer ({name}) can have; give a smaller svd_rank")
    method = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
    delta = _weighted_sum([a.delta_weight() for a, _ in present], torch.tensor([w for _, w in present]), method,
                          density, majority_sign_method)  # (out, in)
    _check_finite(name, [w for _, w in present], delta)  # before the SVD, which fails on non-finite input
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U = U[:, :new_rank] @ torch.diag(S[:new_rank])  # (out, rank)
    Vh = Vh[:new_rank, :]  # (rank, in)
    if svd_clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), svd_clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    return Vh, U


def _check_finite(name: str, weights, *tensors: torch.Tensor) -> None:
    """Raise if the combination overflowed float32 in layer ``name``: an adapter holding inf would
    make every output NaN, and its saved file would be refused on loading."""
    if not all(t.isfinite().all() for t in tensors):
        raise ValueError(f"weights {list(weights)} make the combined adapter overflow float32 (above "
                         f"{torch.finfo(torch.float32).max:.1e}) in {name}; use smaller weights. Nothing was added")


def _weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: Optional[float],
                  majority_sign_method: str) -> torch.Tensor:
    """Σ wᵢ·tᵢ over same-shaped tensors, after the sparsifying and sign election of ``method``
    (linear, ties, dare_linear, dare_ties, magnitude_prune), in PEFT's order of operations."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        # keep each entry with probability density, rescaled; density >= 1 keeps all, as PEFT
        tensors = [t if density >= 1 else t * torch.bernoulli(torch.full_like(t, density)) / density for t in tensors]
    stacked = torch.stack(tensors)  # (n, ...)
    weighted = stacked * weights.to(stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    # TIES: elect a sign per entry from the unweighted tensors, average the weighted ones that agree
    sign = stacked.sign()
    votes = stacked.sum(0) if majority_sign_method == "total" else sign.sum(0)
    agrees = sign == torch.where(votes >= 0, 1, -1)
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1.0)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its int(density·numel) largest |entries| set to zero (all kept at density >= 1)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * mask.view(t.shape)


def _combined_config(model, configs, combined, new_rank):
    """The new adapter's LoRAConfig: PEFT's (the first adapter's, with r = lora_alpha = new_rank and the
    union of target_modules) when that selects exactly the combined layers; else one that names them.

    Per-layer ranks below new_rank (``linear`` over rank patterns) go into rank_pattern, with equal
    alpha_pattern entries so that every layer's scaling stays 1. use_rslora is switched off: the
    combined weights already hold the scalings, and rsLoRA's alpha/√r would scale them by √r
    (PEFT 0.21 keeps use_rslora from the first adapter and so does scale them)."""
    ranks = {name: lora_A.shape[0] for name, (lora_A, _) in combined.items()}
    exact = {re.escape(name): rank for name, rank in ranks.items() if rank != new_rank}
    fields = dict(r=new_rank, alpha=new_rank, rank_pattern=exact, alpha_pattern=dict(exact), use_rslora=False,
                  use_dora=False)
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, list) for t in targets):
        union = sorted(set().union(*targets))
    elif all(isinstance(t, str) and t != "all-linear" for t in targets):
        union = "|".join(f"({t})" for t in targets)
    else:
        union = None
    if union is not None:
        try:  # a union of long regexes may exceed the pattern limit: then the names below serve
            candidate = configs[0].replace(target_modules=union, **fields)
            if {name for name, _ in find_targets(model, candidate)} == set(ranks):
                return candidate
        except ValueError:
            pass
    return configs[0].replace(target_modules=sorted(ranks), exclude_modules=None, layers_to_transform=None, **fields)
