"""Intrinsic dimension: train a model inside a random ``d``-dimensional subspace of its weights
(Li et al. 2018, arXiv 1804.08838; Aghajanyan, Zettlemoyer and Gupta 2020, "Intrinsic
Dimensionality Explains the Effectiveness of Language Model Fine-Tuning", arXiv 2012.13255).

The ``D`` projected weights of the model, flattened and concatenated in a fixed order, are::

    DID   θ_D = θ0_D + P·θ_d                   θ_d (d,) trains, starts at 0
    SAID  θ_i = θ0_i + λ_i · (P·θ_{d-m})_i     per projected tensor i of m: λ (m,) trains, starts
                                               at 1; θ_{d-m} + λ are d numbers in all

``P`` (D x d') is never built. It is a stack of ``ceil(D/L)`` independent Fastfood blocks
(Le, Sarlós and Smola 2013), ``L = 2^ceil(log2 d')`` (``d' = d`` for DID, ``d - m`` for SAID),
truncated to its first ``D`` rows::

    M_b = H · G_b · Π_b · H · B_b  (L x L)      H   Walsh-Hadamard (kernels.hadamard_transform)
    P   = [M_1; M_2; ...][:D, :d'] · c          B_b random ±1 diagonal, Π_b random permutation,
                                                G_b Gaussian diagonal scaled by 1/√(L·Σ G_b²)
    θ_d ─pad to L─► ⊙B ─► H ─► Π ─► ⊙G ─► H ─► (nb·L,) ─[:D]─► split per tensor ─► (⊙λ_i) ─► + θ0

Scaling: with ``G_b`` divided by ``√(L·ΣG_b²)`` every column of every block has norm exactly 1
(Li et al.'s normalisation, the one of Aghajanyan et al.'s Fastfood code), and ``c = √(L/D)``
makes the columns of the truncated stack unit-norm on average: ``‖P·θ_d‖ ≈ ‖θ_d‖`` whatever
``D``. One projection costs two Hadamard transforms of ``ceil(D/L)·L`` elements,
``O(D log d)`` time and no stored matrix; its backward (``Pᵀ·dθ_D``) is the same pipeline run
backwards (an autograd Function, nothing saved but the constants). ``B``, ``Π``, ``Π⁻¹`` and the
scaled ``G`` are drawn from ``seed`` with a CPU ``torch.Generator`` the first time they are
needed on a device and cached there (about ``16·D`` bytes); the adapter file holds only
``θ_d`` (and ``λ``) and the config (``d``, ``said``, ``seed``, the projected tensors in order), from
which ``P`` is rebuilt.

One projection per forward pass: the first wrapped module that runs computes every tensor's
delta at once and the others take theirs from that cache. The cache is refreshed when a module
asks for a delta it already took (the next forward pass), when ``θ_d``/``λ`` have changed since
(an optimizer step), or when grad mode changed. A model that runs a wrapped module twice in one
pass (shared blocks) or recomputes it under activation checkpointing stays correct and pays one
more projection per repeated call.

What is projected (:class:`IntrinsicDimensionConfig`): by default every floating-point parameter
of every leaf module except embedding tables (``nn.Embedding``: on MiniLM the word embeddings
are half of the weights, a lookup reads a few rows of them, and projecting them would double the
cost of every step; ``include_embeddings=True`` projects them too, as Aghajanyan et al. project the
whole model) and parameters shared by several modules (tied input and output embeddings).
``trainable_modules`` (e.g. a fresh classifier head) are trained in full outside the subspace
(their parameters then count beside ``d``); by default a head is projected like the rest.

``d = D`` (DID, ``D`` a power of two, so no padding): ``P`` is one square block, invertible, so
every weight vector is reachable and training in ``θ_d`` is ordinary training in a rotated and
rescaled basis (``θ_d`` steps map to full-parameter steps through ``P·Pᵀ``; with ``|G|``
constant ``P`` is orthogonal and the steps are the same). Files: ``peft_type``
``"INTRINSIC_DIMENSION"`` (HF PEFT has no such method); tensors
``base_model.model.<path>intrinsic_dimension.theta_d`` (and ``.said_lambda``), ``<path>`` the
module the projection lives in (the innermost one holding every projected tensor; empty for the
model itself).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kernels.hadamard import hadamard_transform
from lightning_peft._base import (
    AdapterLayer,
    ModulesToSave,
    WrapperLayer,
    freeze_all_but_adapters,
    inside_any,
    wrap_modules_to_save,
)
from lightning_peft.methods import Method, register
from lightning_peft.targeting import (
    TargetSpec,
    check_module_names,
    check_module_spec,
    find_modules,
    find_targets,
    get_parent,
)

PROJECTION_NAME = "intrinsic_dimension"
"""Attribute name of the :class:`IntrinsicProjection` in the module that holds it."""
_JSON_FIELDS = ("d", "said", "seed", "projection", "parameters", "trainable_modules")
_IO_FIELDS = ("peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode")
_PROJECTION_KIND = "fastfood-blocks-v1"
"""``adapter_config.json``'s ``projection``: how ``P`` is drawn from the seed (this file's)."""
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


@dataclass
class IntrinsicDimensionConfig:
    """What :func:`apply_intrinsic` projects and trains."""

    d: int = 1000
    """Dimension of the subspace: the number of numbers that train (SAID: ``d - m`` projected
    coordinates plus ``m`` scales, one per projected tensor). At least 1 and at most ``D``, the
    number of projected weights (checked against the model)."""
    said: bool = True
    """Structure-aware intrinsic dimension (SAID): one trainable scale ``λ_i`` per projected
    tensor (``d`` must exceed their number ``m``). ``False``: direct (DID), ``θ_D = θ0 + P·θ_d``."""
    seed: int = 0
    """Seed of the random ``B``, ``Π``, ``G`` of the Fastfood projection (saved with the adapter:
    it rebuilds ``P``), an integer in [0, 2**63)."""
    target_modules: str | list[str] | None = None
    """Whose parameters are projected: ``None`` every leaf module (embeddings only with
    ``include_embeddings``); names (exact or dotted suffix), a regex (full match), or
    ``"all-linear"``. Parameters shared by several modules are never projected."""
    exclude_modules: str | list[str] | None = None
    """Names (exact or dotted suffix) or a regex of modules whose parameters are not projected."""
    include_embeddings: bool = False
    """Whether ``nn.Embedding`` tables are projected (they are frozen otherwise; see the module
    docstring for the cost)."""
    trainable_modules: list[str] | None = None
    """Modules trained in full as trainable copies beside the subspace (e.g. ``["classifier"]``);
    their parameters are not projected."""

    def __post_init__(self) -> None:
        d = self.d
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError(f"d must be an integer >= 1 (the dimension of the subspace that trains), "
                             f"got {d!r}")
        for name in ("said", "include_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        self.target_modules = check_module_spec(self.target_modules, "target_modules")
        self.exclude_modules = check_module_spec(self.exclude_modules, "exclude_modules")
        if self.exclude_modules == "all-linear":
            raise ValueError("exclude_modules='all-linear' is not supported: name the modules or give "
                             "a regex")
        self.trainable_modules = check_module_names(self.trainable_modules, "trainable_modules")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# 2. The Fastfood projection
# --------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Constants:
    """``B`` (nb, L) ±1, the flat permutation and its inverse (nb·L,) (int32 below 2^31 entries)
    with the block offsets folded in, and ``G·c`` (nb, L): everything ``P`` needs on one device."""

    def __init__(self, sign: Tensor, perm: Tensor, inverse: Tensor, gain: Tensor) -> None:
        self.sign, self.perm, self.inverse, self.gain = sign, perm, inverse, gain


class Fastfood:
    """``P`` (D x d_in) as stacked Fastfood blocks drawn from ``seed``; ``self(theta)`` is
    ``P·theta`` (differentiable in ``theta``), :meth:`transpose` is ``Pᵀ·y``."""

    def __init__(self, d_in: int, D: int, seed: int) -> None:
        if d_in < 1 or D < d_in:
            raise ValueError(f"Fastfood needs 1 <= d_in <= D, got d_in={d_in}, D={D}")
        self.d_in, self.D, self.seed = d_in, D, seed
        self.L = _next_pow2(d_in)
        self.blocks = -(-D // self.L)
        self._cache: dict[torch.device, _Constants] = {}

    def __deepcopy__(self, memo: dict) -> Fastfood:  # the constants are rebuilt, never copied
        return Fastfood(self.d_in, self.D, self.seed)

    def __getstate__(self) -> dict:
        return {"d_in": self.d_in, "D": self.D, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["d_in"], state["D"], state["seed"])

    def constants(self, device: torch.device) -> _Constants:
        found = self._cache.get(device)
        if found is None:
            found = self._cache[device] = self._draw(device)
        return found

    def _draw(self, device: torch.device) -> _Constants:
        nb, L = self.blocks, self.L
        g = torch.Generator().manual_seed(self.seed)
        sign = (torch.randint(0, 2, (nb, L), generator=g) * 2 - 1).to(torch.float32)  # B
        perm = torch.argsort(torch.rand(nb, L, generator=g), dim=1, stable=True)  # Π per block
        gauss = torch.randn(nb, L, generator=g, dtype=torch.float64)  # G
        gauss = gauss / torch.sqrt(L * gauss.square().sum(1, keepdim=True))  # unit-norm block columns
        gauss = gauss * math.sqrt(L / self.D)  # c: unit-norm columns of the truncated stack
        offsets = torch.arange(nb).unsqueeze(1) * L
        flat = (perm + offsets).reshape(-1)  # (nb·L,) positions in the flattened blocks
        inverse = torch.empty_like(flat)
        inverse[flat] = torch.arange(flat.numel())
        if flat.numel() < 2 ** 31:  # int32 indices: half the memory, a faster gather
            flat, inverse = flat.to(torch.int32), inverse.to(torch.int32)
        return _Constants(sign.to(device), flat.to(device), inverse.to(device),
                          gauss.to(device=device, dtype=torch.float32))

    def __call__(self, theta: Tensor) -> Tensor:
        """``P·theta`` (D,), fp32."""
        return _FastfoodFn.apply(theta, self)

    def forward_raw(self, theta: Tensor) -> Tensor:
        c = self.constants(theta.device)
        nb, L = self.blocks, self.L
        x = torch.nn.functional.pad(theta.float(), (0, L - self.d_in))  # (L,)
        y = hadamard_transform(c.sign * x)  # (nb, L): H·B_b·x for every block
        y = y.reshape(-1).index_select(0, c.perm).reshape(nb, L).mul_(c.gain)  # G·Π
        y = hadamard_transform(y).reshape(-1)  # (nb·L,)
        return y[: self.D] if self.D < y.numel() else y

    def transpose(self, grad: Tensor) -> Tensor:
        """``Pᵀ·grad`` (d_in,), fp32: the pipeline backwards (every factor is symmetric but Π)."""
        c = self.constants(grad.device)
        nb, L = self.blocks, self.L
        g = torch.nn.functional.pad(grad.float().reshape(-1), (0, nb * L - self.D)).reshape(nb, L)
        g = hadamard_transform(g).mul_(c.gain).reshape(-1)
        g = g.index_select(0, c.inverse).reshape(nb, L)  # Πᵀ
        g = hadamard_transform(g).mul_(c.sign)  # (nb, L)
        return g.sum(0)[: self.d_in]


class _FastfoodFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta: Tensor, fastfood: Fastfood) -> Tensor:
        ctx.fastfood = fastfood
        ctx.dtype = theta.dtype
        return fastfood.forward_raw(theta)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        return ctx.fastfood.transpose(grad).to(ctx.dtype), None


# --------------------------------------------------------------------------------------------
# 3. The modules: the projection (θ_d, λ) and the wrapped layers
# --------------------------------------------------------------------------------------------


class _Deltas:
    """The per-forward cache of every projected tensor's delta (never copied with the model)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.deltas: list[Tensor] = []
        self.taken: set[int] = set()

    def __deepcopy__(self, memo: dict) -> _Deltas:
        return _Deltas()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class IntrinsicProjection(AdapterLayer):
    """Holds ``theta_d`` (d' = d, or d - m with SAID; zeros) and, for SAID, ``said_lambda`` (m;
    ones), the Fastfood ``P`` rebuilt from ``seed``, and the order and shapes of the ``m``
    projected tensors. :meth:`delta` gives tensor ``i``'s ``(P·θ)_i`` from a cache computed once
    per forward pass. Its own ``forward`` returns its input (it may sit in an ``nn.Sequential``)."""

    runs_base_when_disabled = True  # it runs nothing: its layers do

    adapter_dtype = torch.float32
    merges_away = True
    """Once every :class:`IntrinsicDimensionLayer` is merged, nothing reads this module: an export
    to a plain model drops it."""

    def __init__(self, d: int, said: bool, seed: int, names: Sequence[str],
                 shapes: Sequence[Sequence[int]], device: torch.device | str | None = None) -> None:
        super().__init__()
        self.d, self.said, self.seed = int(d), bool(said), int(seed)
        self.names: tuple[str, ...] = tuple(names)
        """Projected tensors ``"<module path>.<param>"`` relative to the module applied to, in
        ``P``'s row order (file names are recomputed from the layers' paths)."""
        self.shapes = tuple(tuple(int(s) for s in shape) for shape in shapes)
        self.numels = tuple(math.prod(s) for s in self.shapes)
        self.D = sum(self.numels)
        m = len(self.shapes)
        _check_d(self.d, self.D, m, self.said, "d")
        d_in = self.d - m if self.said else self.d
        self.fastfood = Fastfood(d_in, self.D, self.seed)
        self.theta_d = nn.Parameter(torch.zeros(d_in, dtype=torch.float32, device=device))
        if self.said:
            self.said_lambda = nn.Parameter(torch.ones(m, dtype=torch.float32, device=device))
        else:
            self.register_parameter("said_lambda", None)
        self._deltas = _Deltas()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if not self.theta_d.is_meta:
                self.theta_d.zero_()
            if self.said_lambda is not None and not self.said_lambda.is_meta:
                self.said_lambda.fill_(1.0)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        out = {"theta_d": self.theta_d}
        if self.said_lambda is not None:
            out["said_lambda"] = self.said_lambda
        return out

    def forward(self, x: Any) -> Any:
        return x

    def all_deltas(self) -> list[Tensor]:
        """``(P·θ_d)_i`` of every projected tensor in its shape, fp32 (λ not applied), computed
        now (differentiable in ``theta_d`` when grad is enabled)."""
        flat = self.fastfood(self.theta_d)  # (D,)
        return [t.view(s) for t, s in zip(flat.split(self.numels), self.shapes)]

    def delta(self, index: int) -> Tensor:
        """Tensor ``index``'s ``(P·θ_d)_i`` from the per-forward cache (see the module docstring)."""
        cache = self._deltas
        lam = self.said_lambda
        key = (self.theta_d._version, None if lam is None else lam._version, torch.is_grad_enabled(),
               torch.is_inference_mode_enabled(), self.theta_d.device, id(self.theta_d))
        if cache.key != key or index in cache.taken:
            cache.deltas, cache.key, cache.taken = self.all_deltas(), key, set()
        cache.taken.add(index)
        return cache.deltas[index]

    def weight(self, index: int, base: Tensor) -> Tensor:
        """``θ0_i + λ_i·(P·θ)_i`` (DID: ``θ0_i + (P·θ)_i``) in ``base``'s dtype."""
        delta = self.delta(index).to(base.dtype)
        if self.said_lambda is None:
            return base + delta
        return torch.addcmul(base, delta, self.said_lambda[index].to(base.dtype))

    def extra_repr(self) -> str:
        kind = "SAID" if self.said else "DID"
        return (f"{kind}, d={self.d}, D={self.D}, tensors={len(self.shapes)}, seed={self.seed}, "
                f"blocks={self.fastfood.blocks}x{self.fastfood.L}")


class IntrinsicDimensionLayer(WrapperLayer):
    """A module (``base_layer``, its parameters frozen as ``θ0``) whose direct parameters
    ``param_names`` run as ``θ0 + (λ·)P·θ`` through ``torch.func.functional_call``. It owns no
    tensor: ``θ_d``/``λ`` live in the model's :class:`IntrinsicProjection` (referenced, not a
    submodule). Merging writes the same weights into ``θ0`` (the originals kept for
    :meth:`unmerge`, bit for bit)."""

    runs_base_when_disabled = True

    def __init__(self, base_layer: nn.Module, indices: Mapping[str, int],
                 projection: IntrinsicProjection) -> None:
        super().__init__()
        if isinstance(base_layer, AdapterLayer):
            raise ValueError(f"IntrinsicDimensionLayer does not wrap another adapter layer "
                             f"({type(base_layer).__name__})")
        self.base_layer = base_layer
        self.param_names: tuple[str, ...] = tuple(indices)
        self.indices = dict(indices)
        self.__dict__["_projection"] = projection  # not a submodule: one projection, many layers
        self._restore: dict[str, Tensor] = {}
        self.merged = False

    @property
    def projection(self) -> IntrinsicProjection:
        return self.__dict__["_projection"]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged or self.__dict__.get("_disabled", False):
            return self.base_layer(*args, **kwargs)
        proj = self.projection
        weights = {n: proj.weight(self.indices[n], self.base_layer._parameters[n]) for n in self.param_names}
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """Write ``θ0 + (λ·)P·θ`` into the base parameters, keeping ``θ0`` for :meth:`unmerge`."""
        if self.merged:
            warnings.warn("IntrinsicDimensionLayer is already merged; merge() does nothing", stacklevel=2)
            return
        proj = self.projection
        new = {}
        for name in self.param_names:
            base = self.base_layer._parameters[name]
            new[name] = proj.weight(self.indices[name], base)
        for name in self.param_names:  # every new weight computed first: a failure changes nothing
            base = self.base_layer._parameters[name]
            self._restore[name] = base.detach().clone()
            base.copy_(new[name])
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put ``θ0`` back, bit for bit."""
        if not self.merged:
            warnings.warn("IntrinsicDimensionLayer is not merged; unmerge() does nothing", stacklevel=2)
            return
        for name in self.param_names:
            self.base_layer._parameters[name].copy_(self._restore.pop(name))
        self.merged = False

    def extra_repr(self) -> str:
        return f"params={list(self.param_names)}, merged={self.merged}"


def intrinsic_layers(model: nn.Module) -> list[tuple[str, IntrinsicDimensionLayer]]:
    """``(name, layer)`` of every wrapped module of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IntrinsicDimensionLayer)]


def find_projection(model: nn.Module) -> tuple[str, IntrinsicProjection] | None:
    """``(path, projection)`` of the :class:`IntrinsicProjection` in ``model``, or ``None``."""
    for name, module in model.named_modules():
        if isinstance(module, IntrinsicProjection):
            return name, module
    return None


# --------------------------------------------------------------------------------------------
# 4. Selecting, apply_intrinsic, injecting
# --------------------------------------------------------------------------------------------


def _check_d(d: int, D: int, m: int, said: bool, what: str) -> None:
    if d <= 0:
        raise ValueError(f"{what} must be an integer >= 1, got {d}")
    if d > D:
        raise ValueError(f"{what}={d} exceeds D={D}, the number of projected weights: choose d in "
                         f"[1, {D}] (or project more modules)")
    if said and d <= m:
        raise ValueError(f"{what}={d} with said=True must exceed m={m}, the number of projected tensors "
                         f"(one scale λ each, the rest project): choose d > {m} or said=False")


def _matcher(spec: str | list[str]) -> Callable[[str], bool]:
    if isinstance(spec, str):
        import re

        pattern = re.compile(spec)
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(name == e or name.endswith("." + e) for e in spec)


def _shared(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _trainable(model: nn.Module, config: IntrinsicDimensionConfig) -> list[str]:
    names = find_modules(model, config.trainable_modules, "trainable_modules") \
        if config.trainable_modules else []
    return [t for t in names if not any(t.startswith(o + ".") for o in names)]


def select_parameters(model: nn.Module, config: IntrinsicDimensionConfig) -> tuple[list[str], list[str]]:
    """``(["<module>.<param>", ...], trainable module names)``: the tensors ``config`` projects on
    ``model``, in the model's order, or a ``ValueError`` naming the argument. Reads only."""
    trainable = _trainable(model, config)
    adapters = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    shared = _shared(model)
    spec = config.target_modules
    if spec == "all-linear":
        match = set(find_targets(model, "all-linear", config.exclude_modules)).__contains__
    else:
        match = (lambda name: True) if spec is None else _matcher(spec)
    exclude = _matcher(config.exclude_modules) if config.exclude_modules is not None else None
    names: list[str] = []
    matched: list[str] = []
    for name, module in model.named_modules():
        if not name or inside_any(name, adapters) or any(True for _ in module.children()):
            continue
        if not match(name) or (exclude is not None and exclude(name)):
            continue
        matched.append(name)
        if inside_any(name, trainable):
            continue
        if isinstance(module, nn.Embedding) and not config.include_embeddings:
            continue
        for pname, param in module._parameters.items():
            if param is not None and param.is_floating_point() and id(param) not in shared:
                names.append(f"{name}.{pname}")
    if isinstance(spec, list) or not names:
        leaves = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                         if n and not any(True for _ in m.children()) and any(True for _ in m.parameters())})
        known = f"; leaf modules with parameters: {leaves[:30]}{' ...' if len(leaves) > 30 else ''}"
    if isinstance(spec, list):
        for entry in spec:
            if not any(_matcher([entry])(n) for n in matched):
                raise ValueError(f"target_modules entry {entry!r} matches no leaf module of "
                                 f"{type(model).__name__}{known}")
    if not names:
        raise ValueError(f"target_modules={spec!r} (exclude_modules={config.exclude_modules!r}, "
                         f"include_embeddings={config.include_embeddings}) leaves no parameter of "
                         f"{type(model).__name__} to project{known}")
    return names, trainable


def _home(model: nn.Module, names: Sequence[str]) -> str:
    """The innermost module holding every projected tensor, above any container (the
    projection is added to it as a child)."""
    paths = [n.rpartition(".")[0].split(".") for n in names]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if len(common) == min(len(p) for p in paths):  # a projected module itself: its parent
        common = common[:-1]
    while common and isinstance(model.get_submodule(".".join(common)), _CONTAINERS):
        common.pop()
    return ".".join(common)


def _make_config(config: IntrinsicDimensionConfig | None, **keywords: Any) -> IntrinsicDimensionConfig:
    if config is None:
        return IntrinsicDimensionConfig(**keywords)
    if not isinstance(config, IntrinsicDimensionConfig):
        raise TypeError(f"config must be an IntrinsicDimensionConfig, got {type(config).__name__}")
    defaults = asdict(IntrinsicDimensionConfig())
    given = [k for k, v in keywords.items() if v != defaults.get(k)]
    if given:
        raise ValueError(f"pass either config= or the keyword arguments, not both: {given} given beside "
                         f"config")
    return config


def _plan(model: nn.Module, names: Sequence[str], d: int, said: bool, what: str) -> list[Tensor]:
    """The parameters ``names`` name on ``model``, checked (reads only)."""
    params = []
    for name in names:
        path, _, pname = name.rpartition(".")
        params.append(model.get_submodule(path)._parameters[pname])
    _check_d(d, sum(p.numel() for p in params), len(params), said, what)
    return params


def apply_intrinsic(model: nn.Module, d: int = 1000, said: bool = True, seed: int = 0,
                    target_modules: TargetSpec = None, exclude_modules: TargetSpec = None,
                    include_embeddings: bool = False, trainable_modules: Sequence[str] | None = None,
                    config: IntrinsicDimensionConfig | None = None) -> nn.Module:
    """Train ``model`` in a random ``d``-dimensional subspace of its weights (SAID by default, DID
    with ``said=False``): wrap the modules whose parameters are projected, add the
    :class:`IntrinsicProjection` (``θ_d = 0``: the model computes exactly what it did), freeze
    everything else, return ``model`` (changed in place). Arguments are the fields of
    :class:`IntrinsicDimensionConfig` (or ``config=`` alone). ``d <= 0`` or ``d > D`` (the number
    of projected weights) is a ``ValueError`` naming ``d``. A model that already carries the same
    subspace is returned as is; another is refused."""
    config = _make_config(config, d=d, said=said, seed=seed, target_modules=target_modules,
                          exclude_modules=exclude_modules, include_embeddings=include_embeddings,
                          trainable_modules=trainable_modules)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = find_projection(model)
    if found is not None:
        proj = found[1]
        if (proj.d, proj.said, proj.seed) != (config.d, config.said, config.seed):
            raise ValueError(f"the model already carries an intrinsic-dimension subspace with d={proj.d}, "
                             f"said={proj.said}, seed={proj.seed}; subspaces do not stack: use a fresh "
                             f"model")
        return model
    names, trainable = select_parameters(model, config)
    _plan(model, names, config.d, config.said, "d")
    inject_intrinsic(model, names, config.d, config.said, config.seed, trainable)
    return model


def inject_intrinsic(model: nn.Module, names: Sequence[str], d: int, said: bool, seed: int,
                     trainable: Sequence[str] = ()) -> nn.Module:
    """Wrap the modules of the tensors ``names`` (``"<module>.<param>"``, in ``P``'s order), add
    the projection, wrap ``trainable`` in :class:`ModulesToSave`, freeze the rest. The names are
    trusted (:func:`select_parameters` or a checked file gave them)."""
    params = _plan(model, names, d, said, "d")
    home = _home(model, names)
    holder = model.get_submodule(home) if home else model
    if PROJECTION_NAME in holder._modules or hasattr(holder, PROJECTION_NAME):
        raise ValueError(f"{type(holder).__name__} already has an attribute {PROJECTION_NAME!r}")
    device = params[0].device
    projection = IntrinsicProjection(d, said, seed, names, [p.shape for p in params], device=device)
    by_module: dict[str, dict[str, int]] = {}
    for index, name in enumerate(names):
        path, _, pname = name.rpartition(".")
        by_module.setdefault(path, {})[pname] = index
    for path, indices in by_module.items():
        parent, child = get_parent(model, path)
        setattr(parent, child, IntrinsicDimensionLayer(model.get_submodule(path), indices, projection))
    holder.add_module(PROJECTION_NAME, projection)
    wrap_modules_to_save(model, list(trainable))
    freeze_all_but_adapters(model)
    return model


# --------------------------------------------------------------------------------------------
# 5. Registry entry
# --------------------------------------------------------------------------------------------


def intrinsic_to_json(root: nn.Module) -> dict[str, Any]:
    """``adapter_config.json`` fields of the subspace of ``root``, read from its modules: ``d``,
    ``said``, ``seed``, ``projection`` (how ``P`` is drawn), ``parameters`` (``[["<module>.<param>",
    numel], ...]`` in ``P``'s row order, paths relative to ``root``) and ``trainable_modules``."""
    found = find_projection(root)
    if found is None:
        raise ValueError(f"{type(root).__name__} carries no intrinsic-dimension subspace; apply it first "
                         f"with apply_intrinsic(model, d=...) or IntrinsicDimensionCallback")
    _, proj = found
    names: list[str | None] = [None] * len(proj.shapes)
    for path, layer in intrinsic_layers(root):
        if layer.projection is not proj:
            raise ValueError("the model carries layers of two intrinsic-dimension projections")
        for pname, index in layer.indices.items():
            names[index] = f"{path}.{pname}"
    if any(n is None for n in names):
        raise ValueError("some projected tensors are not inside the module being saved; save the model "
                         "that holds all of them")
    trainable = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    return {"d": proj.d, "said": proj.said, "seed": proj.seed, "projection": _PROJECTION_KIND,
            "parameters": [[n, numel] for n, numel in zip(names, proj.numels)],
            "trainable_modules": trainable or None}


def _int_field(cfg: dict, key: str, where: str, low: int, high: int | None = None) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low \
            or (high is not None and value >= high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high})"
        raise ValueError(f"{where}: {key} must be {bound}, got {value!r}")
    return value


def _fields(cfg: Any, where: str) -> tuple[int, bool, int, list[tuple[str, int]], list[str]]:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: the config must be a JSON object, got {type(cfg).__name__}")
    unknown = sorted(k for k in cfg if k not in _JSON_FIELDS + _IO_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown intrinsic-dimension config fields {unknown}; it holds "
                         f"{list(_JSON_FIELDS)}")
    d = _int_field(cfg, "d", where, 1)
    seed = _int_field(cfg, "seed", where, 0, 2 ** 63)
    said = cfg.get("said")
    if not isinstance(said, bool):
        raise ValueError(f"{where}: said must be true or false, got {said!r}")
    if cfg.get("projection") != _PROJECTION_KIND:
        raise ValueError(f"{where}: projection is {cfg.get('projection')!r}; this version rebuilds "
                         f"{_PROJECTION_KIND!r} only")
    params = cfg.get("parameters")
    if not isinstance(params, list) or not params:
        raise ValueError(f"{where}: parameters must be a non-empty list of [\"<module>.<param>\", numel], "
                         f"got {params!r}")
    out = []
    for entry in params:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and "." in entry[0] and all(entry[0].split(".")) and isinstance(entry[1], int)
                and not isinstance(entry[1], bool) and entry[1] >= 1):
            raise ValueError(f"{where}: parameters entry {entry!r} is not [\"<module>.<param>\", numel >= 1]")
        out.append((entry[0], entry[1]))
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"{where}: parameters names a tensor more than once")
    trainable = cfg.get("trainable_modules")
    if trainable is None:
        trainable = []
    elif not isinstance(trainable, list) or not all(isinstance(e, str) and e for e in trainable):
        raise ValueError(f"{where}: trainable_modules must be a list of module names or null, got "
                         f"{trainable!r}")
    return d, said, seed, out, list(trainable)


def intrinsic_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    """Check every field against ``model`` (changing nothing) and return ``inject(model)``."""
    d, said, seed, params, trainable = _fields(cfg, where)
    modules = dict(model.named_modules())
    adapters = [n for n, m in modules.items() if isinstance(m, AdapterLayer)]
    for name in trainable:
        if name not in modules or inside_any(name, adapters):
            raise ValueError(f"{where}: trainable_modules names {name!r}, which {type(model).__name__} "
                             f"does not have")
    shared = _shared(model)
    for name, numel in params:
        path, _, pname = name.rpartition(".")
        module = modules.get(path)
        if module is None or isinstance(module, AdapterLayer) or inside_any(path, adapters):
            raise ValueError(f"{where}: parameters names {name!r}, but {type(model).__name__} has no module "
                             f"{path!r} to wrap")
        param = module._parameters.get(pname)
        if param is None or not param.is_floating_point():
            raise ValueError(f"{where}: parameters names {name!r}, but {path} has no floating-point "
                             f"parameter {pname!r}")
        if param.numel() != numel:
            raise ValueError(f"{where}: parameters records {numel} weights for {name!r}; the model's has "
                             f"{param.numel()}")
        if id(param) in shared or inside_any(path, trainable):
            raise ValueError(f"{where}: parameters names {name!r}, a tied parameter or one inside "
                             f"trainable_modules")
    names = [n for n, _ in params]
    try:
        _check_d(d, sum(n for _, n in params), len(params), said, "d")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None

    def inject(target: nn.Module) -> None:
        inject_intrinsic(target, names, d, said, seed, trainable)

    return inject


def intrinsic_update_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[], None]:
    """For a model that already carries a subspace: the file must describe the same one."""
    d, said, seed, params, trainable = _fields(cfg, where)
    carried = intrinsic_to_json(model)
    mine = (carried["d"], carried["said"], carried["seed"], [tuple(p) for p in carried["parameters"]],
            sorted(carried["trainable_modules"] or []))
    if mine != (d, said, seed, params, sorted(trainable)):
        raise ValueError(f"{where}: the file describes another subspace (d, said, seed, parameters or "
                         f"trainable_modules differ) than the one the model carries; load it into a "
                         f"fresh model instead")
    return lambda: None


def _detect(model: nn.Module) -> bool:
    return find_projection(model) is not None


METHOD = register(Method(
    name="intrinsic_dimension",
    config_class=IntrinsicDimensionConfig,
    peft_type="INTRINSIC_DIMENSION",
    apply=apply_intrinsic,
    detect=_detect,
    to_json=intrinsic_to_json,
    from_json=intrinsic_from_json,
    update_from_json=intrinsic_update_from_json,
    aliases=("intrinsic",),
))

__all__ = ["Fastfood", "IntrinsicDimensionConfig", "IntrinsicDimensionLayer", "IntrinsicProjection",
           "apply_intrinsic", "find_projection", "inject_intrinsic", "intrinsic_layers",
           "select_parameters"]
