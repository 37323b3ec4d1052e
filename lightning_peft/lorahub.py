"""LoRAHub: compose LoRA adapters for a new task from a few examples (Huang et al., 2023,
arXiv 2307.13269).

Given K LoRA adapters trained on other tasks (same base model, same target modules, any ranks)
and a handful of examples of a new task, LoRAHub looks for weights ``w`` of the combination

    ΔW = Σ_i w_i · s_i · B_i A_i                    (per target module; s_i = alpha_i / r_i)

that minimise the few-shot loss plus the paper's L1 regulariser, by gradient-free search
(nevergrad's ``NGOpt``, as the paper, over ``w ∈ [-1.5, 1.5]^K``, starting at 0):

    w* = argmin_w  L_few-shot(W0 + ΔW(w)) + α · Σ_i |w_i|          (α = ``l1``, 0.05 by default)

The combination of the *updates* (no cross terms ``B_i A_j``) is one LoRA of rank Σ r_i exactly:

    A = [A_1; A_2; ...; A_K]                (Σr, in)     stacked rows
    B = [w_1 s_1 B_1, ..., w_K s_K B_K]     (out, Σr)    stacked columns, scaling 1 (alpha = r)
    B·A = Σ_i w_i s_i B_i A_i

so the model carries a single plain LoRA layer per target and a candidate ``w`` only rescales
the blocks of ``B`` in place: nothing is re-injected or merged between evaluations. The result is
a normal HF PEFT LoRA adapter (``save_adapter``; rank Σ r_i, ``lora_alpha`` = rank) that loads
anywhere a LoRA adapter does.

    x ──┬──────────────── W0 ──────────────────┐
        └─ [A_1; ...; A_K] ─ [w_1 s_1 B_1 ... w_K s_K B_K] ─ + ──> y
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._base import AdapterLayer, ModelState, first_names
from lightning_peft.io import _read_adapter, _transformers_root
from lightning_peft.methods import get_method
from lightning_peft.methods.lora import LoRAConfig, LoRALinear, apply_lora, lora_scaling
from lightning_peft.targeting import conv1d_class, is_linear_like

try:  # LoRA's own adapter_config.json checks, where lora.py has them
    from lightning_peft.methods.lora import _check_json as _check_lora_json
except ImportError:  # pragma: no cover
    _check_lora_json = None

__all__ = ["LoRAHubResult", "lorahub", "lorahub_combine"]

LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]


@dataclass
class LoRAHubResult:
    """What :func:`lorahub` found; the model carries the combination with :attr:`weights`."""

    weights: list[float]
    """``w_i`` of each adapter, in the order of ``adapter_dirs``."""
    loss_before: float
    """Few-shot loss of the uniform mix (``w_i = 1/K``), the paper's starting point to beat."""
    loss_after: float
    """Few-shot loss with :attr:`weights` (without the L1 term)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every candidate the optimiser evaluated, in order: ``{"weights", "loss", "objective"}``
    (objective = loss + l1 · Σ|w_i|)."""
    loss_base: float | None = None
    """Few-shot loss of the base model without any adapter (measured first, which also checks
    the examples and ``loss_fn`` before the model is changed)."""


@dataclass
class _Adapter:
    """One LoRA adapter read from its directory: ``{module path: (A (r, in), s·B (out, r))}``."""

    where: str
    factors: dict[str, tuple[Tensor, Tensor]]


# ------------------------------------------------------------------------------ reading adapters


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """HF PEFT's ``rank_pattern``/``alpha_pattern`` lookup (first key ``k`` with
    ``(.*\\.)?(k)$`` matching ``name``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_lora(directory: str | Path) -> _Adapter:
    """Read a LoRA adapter directory and fold each module's scaling into its ``B``: only plain
    LoRA (no DoRA, no modules trained in full, no trained biases) is a combination of updates."""
    config, tensors, where = _read_adapter(directory)
    where = str(directory)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where} holds a {config.get('peft_type')} adapter, not LoRA; LoRAHub "
                         f"composes LoRA adapters only")
    method = get_method("lora")
    if _check_lora_json is not None:  # the LoRA file checks (types, ranges, unsupported options)
        _check_lora_json(config, where)
    refused = [f"{k}={config[k]!r}" for k in ("use_dora", "modules_to_save") if config.get(k)]
    if config.get("bias", "none") not in (None, "none"):
        refused.append(f"bias={config['bias']!r}")
    if refused:
        raise ValueError(f"{where}: LoRAHub combines plain LoRA updates only; this adapter also has "
                         f"{', '.join(refused)}")
    prefix, pairs, other = method.file_prefix, {}, []
    for key, tensor in tensors.items():
        match = re.fullmatch(rf"{re.escape(prefix)}(.+)\.lora_([AB])\.weight", key)
        if match is None:
            other.append(key)
        else:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    if other:
        raise ValueError(f"{where}: tensors that are not LoRA factors ({first_names(sorted(other))}); "
                         f"LoRAHub combines plain LoRA updates only")
    if not pairs:
        raise ValueError(f"{where}: adapter_model.safetensors holds no LoRA factors")
    factors = {}
    rslora = bool(config.get("use_rslora", False))
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: module {path!r} has lora_{next(iter(ab))} but not its partner")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or not a.is_floating_point() \
                or not b.is_floating_point():
            raise ValueError(f"{where}: module {path!r} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}, not floating (r, in) and (out, r) matrices")
        r = int(a.shape[0])
        r_config = _pattern_value(config.get("rank_pattern") or {}, path, config["r"])
        if r_config != r:
            raise ValueError(f"{where}: module {path!r} has rank {r} in the weights but {r_config} in "
                             f"adapter_config.json")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"]))
        scaling = lora_scaling(r, alpha, rslora)
        a64, sb64 = a.to(torch.float64), b.to(torch.float64) * scaling
        if not (torch.isfinite(a64).all() and torch.isfinite(sb64).all()):
            raise ValueError(f"{where}: module {path!r} has NaN/inf in its LoRA factors")
        factors[path] = (a64, sb64)
    return _Adapter(where, factors)


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a Linear-like module (Conv1D stores its weight (in, out))."""
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return tuple(module.weight.shape)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    out, inp = module.weight.shape
    return int(inp), int(out)


def _check_adapters(root: nn.Module, adapters: list[_Adapter]) -> list[str]:
    """Same target modules in every adapter, each a Linear-like module of ``root`` whose shape the
    factors fit; return the module paths."""
    first = adapters[0]
    targets = sorted(first.factors)
    for adapter in adapters[1:]:
        missing = sorted(set(targets) - set(adapter.factors))
        extra = sorted(set(adapter.factors) - set(targets))
        if missing or extra:
            parts = ([f"lacks {first_names(missing)}"] if missing else []) + \
                    ([f"also adapts {first_names(extra)}"] if extra else [])
            raise ValueError(f"{adapter.where} targets other modules than {first.where}: it "
                             f"{' and '.join(parts)}; LoRAHub composes adapters with the same "
                             f"target modules")
    for path in targets:
        try:
            module = root.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{first.where}: module {path!r} is not in the model "
                             f"({type(root).__name__}); was the adapter trained on another base "
                             f"model?") from None
        if not is_linear_like(module):
            raise ValueError(f"{first.where}: module {path!r} of the model is a "
                             f"{type(module).__name__}, not a Linear/Conv1D layer LoRA adapts")
        inp, out = _features(module)
        for adapter in adapters:
            a, sb = adapter.factors[path]
            if a.shape[1] != inp or sb.shape[0] != out:
                raise ValueError(f"{adapter.where}: module {path!r} has lora_A {tuple(a.shape)} and "
                                 f"lora_B {tuple(sb.shape)}, but the model's layer maps {inp} -> {out} "
                                 f"features; the adapter belongs to another base model")
    return targets


# ------------------------------------------------------------------------------ examples and loss


def _is_batch(item: Any) -> bool:
    return isinstance(item, Mapping) and "input_ids" in item


def _batches(examples: Sequence[Any], tokenizer: Any, batch_size: int,
             max_length: int | None) -> list[dict[str, Tensor]]:
    """``examples`` as batches: batches as they are, instruction records encoded as training
    encodes them (:func:`lightning_peft.data.encode_example`: prompt masked in the labels)."""
    if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence):
        raise ValueError(f"examples must be a list of batches (dicts with input_ids, attention_mask, "
                         f"labels) or of instruction records, got {type(examples).__name__}")
    if len(examples) == 0:
        raise ValueError("examples is empty; LoRAHub needs a few examples of the new task")
    if all(_is_batch(e) for e in examples):
        batches = []
        for i, batch in enumerate(examples):
            if "labels" not in batch:
                raise ValueError(f"examples[{i}] has no 'labels'; the few-shot loss needs them "
                                 f"(-100 on the tokens not to score)")
            shape = getattr(batch["input_ids"], "shape", None)
            for key in ("input_ids", "labels", "attention_mask"):
                value = batch.get(key)
                if key in batch and not (isinstance(value, Tensor) and value.dim() == 2
                                         and tuple(value.shape) == tuple(shape or ())):
                    got = (f"shape {tuple(value.shape)}" if isinstance(value, Tensor)
                           else type(value).__name__)
                    raise ValueError(f"examples[{i}]['{key}'] must be a 2-D tensor (batch, tokens) shaped "
                                     f"as its input_ids, got {got}; collate encoded examples "
                                     f"(lightning_peft.data.collate), or pass records with tokenizer=")
            batches.append(dict(batch))
        return batches
    if not all(isinstance(e, Mapping) and "instruction" in e for e in examples):
        raise ValueError("examples must be all batches (dicts with input_ids and labels) or all "
                         "instruction records (dicts with instruction, input, output)")
    if tokenizer is None:
        raise ValueError("examples are instruction records: pass tokenizer= to encode them")
    from lightning_peft.data import _pad_token_id, collate, encode_example

    encoded = [encode_example(tokenizer, r, max_length=max_length, where=f"examples[{i}]")
               for i, r in enumerate(examples)]
    pad = _pad_token_id(tokenizer)
    return [collate(encoded[i:i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


def _token_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """``(sum of next-token cross-entropy over the label tokens, their count)``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]  # (batch, seq-1, vocab)
    labels = batch["labels"][:, 1:]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                       labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


@torch.no_grad()
def _few_shot_loss(model: nn.Module, batches: list[dict[str, Tensor]], loss_fn: LossFn | None) -> float:
    """Mean loss over the examples: token-weighted mean cross-entropy by default, the mean of
    ``loss_fn(model, batch)`` over the batches otherwise."""
    if loss_fn is not None:
        values = [float(loss_fn(model, b)) for b in batches]
        return sum(values) / len(values)
    total, count = 0.0, 0
    for batch in batches:
        loss, n = _token_loss(model, batch)
        total, count = total + float(loss), count + n
    if count == 0:
        raise ValueError("the examples have no label tokens (every label is -100); nothing to score")
    return total / count


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------ the combination


class _Combination:
    """The stacked LoRA layers and the scaled ``s_i·B_i`` blocks that a weight vector rescales."""

    def __init__(self, root: nn.Module, targets: list[str], adapters: list[_Adapter]) -> None:
        ranks = {p: sum(a.factors[p][0].shape[0] for a in adapters) for p in targets}
        groups: dict[int, list[str]] = {}
        for path in targets:
            groups.setdefault(ranks[path], []).append(path)
        with torch.random.fork_rng(devices=[]):  # the (overwritten) init leaves the user's RNG alone
            for rank, names in groups.items():
                apply_lora(root, config=LoRAConfig(
                    r=rank, alpha=float(rank), target_modules="|".join(re.escape(n) for n in names)))
        self.blocks: list[tuple[LoRALinear, list[tuple[slice, Tensor]]]] = []
        with torch.no_grad():
            for path in targets:
                layer = root.get_submodule(path)
                A, B = layer.lora_A, layer.lora_B
                A.copy_(torch.cat([a.factors[path][0] for a in adapters]).to(A.device, A.dtype))
                offset, blocks = 0, []
                for adapter in adapters:
                    sb = adapter.factors[path][1].to(B.device)  # (out, r_i) float64
                    blocks.append((slice(offset, offset + sb.shape[1]), sb))
                    offset += sb.shape[1]
                self.blocks.append((layer, blocks))

    @torch.no_grad()
    def set_weights(self, weights: Sequence[float]) -> None:
        """``B = [w_1 s_1 B_1, ..., w_K s_K B_K]`` in every layer, in place."""
        for layer, blocks in self.blocks:
            for w, (cols, sb) in zip(weights, blocks, strict=True):
                layer.lora_B[:, cols].copy_(sb * float(w))


# ------------------------------------------------------------------------------ LoRAHub


def _check_arguments(budget: Any, l1: Any, seed: Any, batch_size: Any, bound: Any) -> None:
    for name, value in (("budget", budget), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(l1, bool) or not isinstance(l1, (int, float)) or not math.isfinite(l1) or l1 < 0:
        raise ValueError(f"l1 must be a finite number >= 0, got {l1!r}")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) \
            or bound <= 0:
        raise ValueError(f"bound must be a finite positive number, got {bound!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def _import_nevergrad() -> Any:
    try:
        import nevergrad
    except ImportError as err:
        raise ImportError("LoRAHub searches the weights with nevergrad, which is not installed: "
                          "pip install nevergrad (or pip install 'lightning-peft[lorahub]')") from err
    return nevergrad


def _check_dirs(adapter_dirs: Any) -> None:
    if isinstance(adapter_dirs, (str, Path)) or not isinstance(adapter_dirs, Sequence):
        raise ValueError(f"adapter_dirs must be a list of adapter directories, got "
                         f"{type(adapter_dirs).__name__}")
    if len(adapter_dirs) == 0:
        raise ValueError("adapter_dirs is empty; LoRAHub composes at least one LoRA adapter")


def _prepare(model: nn.Module, adapter_dirs: Sequence[str | Path]) -> tuple[nn.Module, list[str],
                                                                           list[_Adapter]]:
    """``(root, target module paths, adapters)`` once everything is checked (model unchanged)."""
    _, root = _transformers_root(model)
    carried = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if carried:
        raise ValueError(f"the model already carries adapter layers ({first_names(carried)}); LoRAHub "
                         f"injects the combined LoRA into the base model: pass one without adapters")
    adapters = [_read_lora(d) for d in adapter_dirs]
    return root, _check_adapters(root, adapters), adapters


def lorahub_combine(model: nn.Module, adapter_dirs: Sequence[str | Path],
                    weights: Sequence[float]) -> nn.Module:
    """Inject ``Σ_i w_i s_i B_i A_i`` of the LoRA adapters in ``adapter_dirs`` into ``model`` as one
    stacked LoRA (rank Σ r_i, scaling 1), with known ``weights`` (no search): e.g. the uniform
    mix, or the weights a :func:`lorahub` run found. Same checks as :func:`lorahub`, before the
    model changes. Returns ``model``."""
    _check_dirs(adapter_dirs)
    finite = lambda w: isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)  # noqa: E731
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) \
            or len(weights) != len(adapter_dirs) or not all(finite(w) for w in weights):
        raise ValueError(f"weights must be {len(adapter_dirs)} finite numbers, one per adapter "
                         f"directory, got {weights!r}")
    root, targets, adapters = _prepare(model, adapter_dirs)
    _Combination(root, targets, adapters).set_weights(weights)
    return model


def lorahub(model: nn.Module, adapter_dirs: Sequence[str | Path], examples: Sequence[Any],
            loss_fn: LossFn | None = None, budget: int = 40, l1: float = 0.05, seed: int = 0,
            batch_size: int = 8, tokenizer: Any = None, max_length: int | None = None,
            bound: float = 1.5) -> LoRAHubResult:
    """Find the weights of a linear combination of LoRA adapters for a new task from a few of its
    examples (LoRAHub, arXiv 2307.13269), and leave ``model`` carrying the combined LoRA.

    Args:
        model: The base model the adapters were trained on, carrying no adapter (a transformers
            causal LM, or a module wrapping one, as :func:`save_adapter` roots it).
        adapter_dirs: LoRA adapter directories (HF PEFT or :func:`save_adapter` format) with the
            same target modules; ranks and alphas may differ.
        examples: A few examples of the new task: batches (dicts with ``input_ids``,
            ``attention_mask``, ``labels`` with -100 where not scored) or instruction records
            (``instruction``/``input``/``output``; pass ``tokenizer``), encoded as training does
            (the prompt masked), ``batch_size`` to a batch.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; averaged over the batches. Default:
            the next-token cross-entropy averaged over all label tokens.
        budget: Number of candidate weight vectors nevergrad's ``NGOpt`` evaluates (the paper: 40).
        l1: ``α`` of the regulariser ``α · Σ|w_i|`` (the paper: 0.05).
        seed: Seed of the optimiser's random state (the search is deterministic in it).
        bound: Weights are searched in ``[-bound, bound]`` (the paper: 1.5), starting at 0.

    Returns:
        :class:`LoRAHubResult`. The weights are the optimiser's recommendation, or the best
        candidate it evaluated where that scored a lower objective.

    Everything (directories, their configs and tensors, shapes against the model, the same target
    modules in every adapter, no adapter on the model, the examples, one pass of the loss on the
    base model) is checked before the model is changed; a problem raises a ``ValueError`` naming
    the adapter and the modules, with the model unchanged; a failure during the search (an
    exception in ``loss_fn``, an interrupt) also leaves it as it was. The combined LoRA layers are plain
    :class:`LoRALinear` layers of rank Σ r_i and scaling 1; :func:`save_adapter` writes them as a
    HF PEFT LoRA adapter. As :func:`apply_lora` does, every other parameter of the model is frozen.
    """
    _check_arguments(budget, l1, seed, batch_size, bound)
    _check_dirs(adapter_dirs)
    ng = _import_nevergrad()
    root, targets, adapters = _prepare(model, adapter_dirs)
    device = _device(model)
    batches = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()}
               for b in _batches(examples, tokenizer, batch_size, max_length)]

    was_training = model.training
    model.eval()
    before = ModelState(model)  # a failure during the search leaves the model without the LoRA
    try:
        loss_base = _few_shot_loss(model, batches, loss_fn)  # checks examples and loss_fn first
        combination = _Combination(root, targets, adapters)
        k = len(adapters)
        history: list[dict[str, Any]] = []
        cache: dict[tuple[float, ...], tuple[float, float]] = {}

        def evaluate(weights: Sequence[float]) -> tuple[float, float]:
            key = tuple(float(w) for w in weights)
            if key not in cache:
                combination.set_weights(key)
                loss = _few_shot_loss(model, batches, loss_fn)
                objective = loss + l1 * sum(abs(w) for w in key)
                cache[key] = (loss, objective if math.isfinite(objective) else math.inf)
                history.append({"weights": list(key), "loss": loss, "objective": cache[key][1]})
            return cache[key]

        loss_before = evaluate([1.0 / k] * k)[0]
        history.clear()  # the uniform mix is the baseline, not a candidate of the search
        import numpy as np

        parametrization = ng.p.Array(init=np.zeros(k), lower=-bound, upper=bound)
        parametrization.random_state = np.random.RandomState(seed)
        optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget, num_workers=1)
        with warnings.catch_warnings():  # scipy's COBYLA (one of NGOpt's picks) adjusts its settings
            warnings.filterwarnings("ignore", message="COBYLA: Invalid", category=UserWarning)
            recommendation = optimizer.minimize(lambda w: evaluate(w)[1])
        weights = [float(w) for w in recommendation.value]
        best = min(history, key=lambda h: h["objective"]) if history else None
        if best is not None and best["objective"] < evaluate(weights)[1]:
            weights = list(best["weights"])
        loss_after = evaluate(weights)[0]
        combination.set_weights(weights)
    except BaseException:
        before.restore()
        raise
    finally:
        model.train(was_training)
    return LoRAHubResult(weights=weights, loss_before=loss_before, loss_after=loss_after,
                         history=history, loss_base=loss_base)
