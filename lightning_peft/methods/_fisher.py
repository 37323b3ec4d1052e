"""The empirical Fisher information of a model's parameters and top-k masks over it: what
Child-tuning's task-driven mode (Xu et al. 2021, arXiv 2109.05687) and FishMask (Sung, Nair and
Raffel 2021, arXiv 2111.09839) choose their weights by. Plain PyTorch.

The diagonal of the empirical Fisher is estimated from ``N`` batches as the mean squared
gradient of the loss::

    F_i ≈ (1/N) · Σ_b (∂L_b / ∂θ_i)²        L_b: the mean loss of batch b

(with one-example batches this is the per-example estimate of the FishMask paper; larger batches
average the gradient first, as Child-tuning's reference code does, which is cheaper and ranks
weights much the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def empirical_fisher(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], Tensor],
                     params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    """``{name: F}`` (float32, the parameter's shape and device) for every parameter in
    ``params``: the mean over ``batches`` of the squared gradient of ``loss_fn(batch)`` (a scalar).

    The model runs in eval mode (no dropout noise in the estimate); its train/eval modes, every
    parameter's ``requires_grad`` and ``.grad`` are restored afterwards, and only ``params`` get
    gradients while it runs. A ``ValueError`` when ``batches`` is empty, ``params`` is empty, or a
    loss is not a finite scalar.
    """
    if not params:
        raise ValueError("no parameter to estimate the Fisher information of")
    chosen = {id(p) for p in params.values()}
    every = list(model.parameters())
    flags = [p.requires_grad for p in every]
    grads = [p.grad for p in every]
    modes = [(m, m.training) for m in model.modules()]
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    count = 0
    try:
        model.eval()
        for p in every:
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        for batch in batches:
            loss = loss_fn(batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
                got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"the Fisher loss must be a scalar float tensor, got {got}")
            if not math.isfinite(float(loss.detach())):
                raise ValueError(f"the loss of Fisher batch {count} is {float(loss.detach())}; the Fisher "
                                 f"information needs finite losses")
            grads_b = torch.autograd.grad(loss.reshape(()), list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads_b):
                if g is not None:
                    fisher[name].add_(g.detach().float().square())
            count += 1
    finally:
        for p, flag, grad in zip(every, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for module, mode in modes:
            module.training = mode
    if count == 0:
        raise ValueError("no batch to estimate the Fisher information from (the data gave none)")
    for f in fisher.values():
        f.div_(count)
    return fisher


def top_k_masks(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Boolean masks (each the shape of its score) selecting exactly the ``k`` largest scores over
    all tensors together (ties broken arbitrarily). A ``ValueError`` for NaN scores or ``k``
    outside ``[0, total]``."""
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"k must lie in [0, {total}] (the number of scored weights), got {k}")
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])  # (total,)
    if bool(torch.isnan(flat).any()):
        raise ValueError("the scores hold NaN; the Fisher information needs finite gradients")
    if k * 2 <= total:
        chosen = torch.zeros(total, dtype=torch.bool)
        if k:
            chosen[torch.topk(flat, k, sorted=False).indices] = True
    else:  # cheaper to find the total - k smallest
        chosen = torch.ones(total, dtype=torch.bool)
        if k < total:
            chosen[torch.topk(flat, total - k, largest=False, sorted=False).indices] = False
    masks = {}
    for name, piece in zip(names, torch.split(chosen, sizes)):
        masks[name] = piece.view(scores[name].shape).to(scores[name].device)
    return masks


__all__ = ["empirical_fisher", "top_k_masks"]
