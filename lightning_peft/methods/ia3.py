"""(IA)³: learned vectors that rescale activations (Liu et al., 2022, arXiv 2205.05638).

Each adapted linear layer ``y = x·W0ᵀ + b`` (``W0`` (out, in), frozen) gets one vector ``l``,
initialised to ones so that training starts from the base model exactly:

    attention target (keys, values)        y = (x·W0ᵀ + b) ⊙ l      ia3_l (out, 1)
    feed-forward target                    y = (x ⊙ l)·W0ᵀ + b      ia3_l (1, in)

            x ──► [ W0, b ] ──► ⊙ l ──► y               x ──► ⊙ l ──► [ W0, b ] ──► y
                   frozen       learned                      learned     frozen

These are HF PEFT's semantics and shapes: a target listed in ``feedforward_modules`` scales its
input, any other its output (bias included). Merging folds ``l`` into the base: the rows of
``W0`` and ``b`` (output scaling) or the columns of ``W0`` (input scaling); unmerging restores
``W0`` and ``b`` bit for bit. The op is :func:`kernels.ia3.ia3_linear`.

Files are HF PEFT's (``peft_type`` ``"IA3"``): ``base_model.model.<path>.ia3_l`` tensors and an
``adapter_config.json`` with ``target_modules``, ``feedforward_modules``, ``fan_in_fan_out``,
``modules_to_save``, ``init_ia3_weights``, ``exclude_modules`` and ``task_type``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

import kernels
from kernels.ia3 import ia3_linear
from lightning_peft._base import (
    AdapterLayer,
    LinearAdapterLayer,
    ModulesToSave,
    freeze_all_but_adapters,
    inside_any,
    names_outside_adapters,
    wrap_modules_to_save,
)
from lightning_peft.methods import Method, planned_injection, register
from lightning_peft.targeting import (
    TargetSpec,
    check_module_spec,
    conv1d_class,
    describe_linear_modules,
    find_modules,
    find_targets,
    get_parent,
    is_linear_like,
    model_type,
    peft_modules_to_save,
)

IA3_TARGET_MODULES: dict[str, list[str]] = {
    # HF PEFT 0.21.2's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, entry for entry
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
"""Default ``target_modules`` per transformers ``model_type`` (HF PEFT's IA3 table)."""

IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    # HF PEFT 0.21.2's TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, entry for entry
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "RefinedWeb": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}
"""Default ``feedforward_modules`` per transformers ``model_type`` (HF PEFT's IA3 table)."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class IA3Config:
    """What :func:`apply_ia3` injects."""

    target_modules: str | list[str] | None = None
    """Names (exact or dotted suffix), a regex (full match), ``"all-linear"``, or None for the
    architecture's default (HF PEFT's table: Llama ``k_proj, v_proj, down_proj``; GPT-2
    ``c_attn, mlp.c_proj``; BERT ``key, value, output.dense``; T5 ``k, v, wo``)."""
    feedforward_modules: str | list[str] | None = None
    """The targets that scale their input instead of their output: names (as HF PEFT matches
    them, a plain suffix of the module's full name), a regex (full match), ``[]`` for none, or
    None for the architecture's default (Llama ``down_proj``). A list must be a subset of a
    ``target_modules`` list."""
    exclude_modules: str | list[str] | None = None
    """Names or regex of modules never to adapt."""
    modules_to_save: list[str] | None = None
    """Modules trained in full, as trainable copies (e.g. ``["classifier"]``)."""
    init_ia3_weights: bool = True
    """Initialise the vectors to ones (the base model exactly); ``False`` draws them from a
    standard normal, as HF PEFT does (discouraged, for tests)."""
    autocast_adapter_dtype: bool = True
    """Keep the vectors in float32 on a half-precision base (HF PEFT's ``autocast_adapter_dtype``),
    also after Lightning's "bf16-true" cast of the whole model. ``False``: the base's dtype."""

    def __post_init__(self) -> None:
        self.target_modules = check_module_spec(self.target_modules, "target_modules")
        self.exclude_modules = check_module_spec(self.exclude_modules, "exclude_modules")
        self.feedforward_modules = _check_feedforward_spec(self.feedforward_modules)
        if self.feedforward_modules == "all-linear":
            raise ValueError("feedforward_modules='all-linear' is not supported: name the feed-forward "
                             "layers (e.g. ['down_proj']), give a regex, or [] for none")
        for flag in ("init_ia3_weights", "autocast_adapter_dtype"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool (True or False), got {getattr(self, flag)!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                    isinstance(e, str) and e for e in self.modules_to_save):
                raise ValueError(f"modules_to_save must be a list of module names, got "
                                 f"{self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save) or None
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            _check_subset(self.feedforward_modules, self.target_modules, "target_modules")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_feedforward_spec(spec: object) -> str | list[str] | None:
    """``feedforward_modules`` as None, a non-empty string or a (possibly empty) list of names."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if not spec:
            raise ValueError("feedforward_modules must not be an empty string (use [] for none)")
        return check_module_spec(spec, "feedforward_modules")  # a valid regex
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(e, str) and e for e in spec):
        return sorted(spec) if isinstance(spec, (set, frozenset)) else list(spec)
    raise ValueError(f"feedforward_modules must be a list of module names ([] for none), a regex "
                     f"string or None, got {spec!r}")


def _check_subset(feedforward: list[str], targets: list[str], targets_are: str) -> None:
    extra = sorted(set(feedforward) - set(targets))
    if extra:
        raise ValueError(f"feedforward_modules must be a subset of the target modules, but {extra} "
                         f"{'is' if len(extra) == 1 else 'are'} not in {targets_are} {sorted(targets)}; "
                         f"add {'it' if len(extra) == 1 else 'them'} to target_modules or remove "
                         f"{'it' if len(extra) == 1 else 'them'} from feedforward_modules")


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


def _quantized(weight: Any) -> bool:
    return isinstance(weight, kernels.NF4Tensor) or getattr(weight, "quant_state", None) is not None


class IA3Linear(LinearAdapterLayer):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` (kept as ``base_layer``) whose output
    (``is_feedforward=False``) or input (``True``) is scaled by the learned vector ``ia3_l``.

    ``Conv1D`` stores its weight (in, out); the layer reads it transposed (``fan_in_fan_out``),
    without copying. A 4-bit base (NF4) runs and trains, but cannot be merged.
    """

    def __init__(self, base_layer: nn.Module, is_feedforward: bool = False,
                 init_ia3_weights: bool = True, autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise ValueError(f"IA3Linear wraps nn.Linear, transformers Conv1D or a 4-bit NF4 layer, "
                             f"got {type(base_layer).__name__}")
        self.base_layer = base_layer
        conv1d = conv1d_class()
        self.fan_in_fan_out = conv1d is not None and isinstance(base_layer, conv1d)
        weight = base_layer.weight
        quantized = _quantized(weight)
        if quantized:
            self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        self.is_feedforward = bool(is_feedforward)
        self.init_ia3_weights = init_ia3_weights
        base_dtype = torch.float32 if quantized else weight.dtype
        # fp32 vectors on a base of at most 32 bits (HF PEFT's autocast_adapter_dtype)
        self._adapter_dtype = torch.float32 if autocast_adapter_dtype and base_dtype in (
            torch.float16, torch.bfloat16, torch.float32) else None
        dtype = self._adapter_dtype or base_dtype
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.empty(shape, device=weight.device, dtype=dtype))
        self.merged = False
        self._restore: dict[str, Any] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Ones (the base model exactly), or a standard normal draw without ``init_ia3_weights``."""
        if self.ia3_l.is_meta:
            return
        with torch.no_grad():
            if self.init_ia3_weights:
                nn.init.ones_(self.ia3_l)
            else:
                nn.init.normal_(self.ia3_l)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l}

    def file_key(self, name: str) -> str:
        return name  # HF PEFT's "<path>.ia3_l"

    @property
    def adapter_dtype(self) -> torch.dtype | None:
        """float32 for a vector kept in fp32 whatever the base is cast to
        (``autocast_adapter_dtype``); None when it follows the model's casts."""
        return self._adapter_dtype

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if _quantized(self.base_layer.weight):  # a 4-bit base: HF PEFT's expression around it
            l = self.ia3_l.reshape(-1)
            if self.is_feedforward:
                return self.base_layer((x.to(l.dtype) * l).to(x.dtype))
            y = self.base_layer(x)
            return (y * l).to(y.dtype)
        return ia3_linear(x, self.weight, self.ia3_l, self.base_layer.bias,
                          feedforward=self.is_feedforward)

    def _scales(self, ia3_l: Tensor) -> tuple[Tensor, Tensor | None]:
        """The vector ``ia3_l`` shaped to broadcast over the stored base weight, and over the bias
        (None when the bias is not scaled)."""
        l = ia3_l.detach().reshape(-1)
        rows_scaled = not self.is_feedforward  # output scaling: the rows of the (out, in) weight
        if self.fan_in_fan_out:  # stored (in, out): output features are columns
            w_scale = l.view(1, -1) if rows_scaled else l.view(-1, 1)
        else:
            w_scale = l.view(-1, 1) if rows_scaled else l.view(1, -1)
        return w_scale, (l if rows_scaled and self.base_layer.bias is not None else None)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``l`` into the base weight (and the bias, for output scaling) as HF PEFT does:
        ``W ⊙ l`` computed in the wider of the two dtypes and rounded to the weight's. The few
        elements that dividing by ``l`` would not give back exactly are remembered, so
        :meth:`unmerge` restores ``W`` and ``b`` bit for bit."""
        if self.merged:
            warnings.warn("IA3 layer is already merged; merge() does nothing", stacklevel=2)
            return
        if _quantized(self.base_layer.weight):
            raise ValueError("an IA3 layer over a 4-bit base cannot be merged (HF PEFT refuses too); "
                             "dequantize the base first")
        w_scale, b_scale = self._scales(self.ia3_l)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        new_w, restore_w = _scaled_with_restore(weight, w_scale)
        new_b, restore_b = (None, None) if b_scale is None else _scaled_with_restore(bias, b_scale)
        self._restore = {"scale": self.ia3_l.detach().clone(), "weight": restore_w, "bias": restore_b}
        weight.copy_(new_w)
        if new_b is not None:
            bias.copy_(new_b)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide ``l`` out again (the ``l`` of :meth:`merge`), restoring the base exactly."""
        if not self.merged:
            warnings.warn("IA3 layer is not merged; unmerge() does nothing", stacklevel=2)
            return
        saved = self._restore
        w_scale, b_scale = self._scales(saved["scale"].to(self.base_layer.weight.device))
        weight, bias = self.base_layer.weight, self.base_layer.bias
        # computed aside and written at the end, so a failure leaves the weight and the flag as
        # they were
        old_w = _unscaled(weight, w_scale, saved["weight"])
        old_b = None if saved["bias"] is None else _unscaled(bias, b_scale, saved["bias"])
        weight.copy_(old_w)
        if old_b is not None:
            bias.copy_(old_b)
        self._restore = None
        self.merged = False

    def extra_repr(self) -> str:
        kind = "input (feed-forward)" if self.is_feedforward else "output"
        return f"in={self.in_features}, out={self.out_features}, scales={kind}, merged={self.merged}"


def _scaled_with_restore(t: Tensor, scale: Tensor) -> tuple[Tensor, tuple]:
    """``(t ⊙ scale)`` rounded to ``t``'s dtype, and what :func:`_unscaled` needs to give ``t``
    back bit for bit from it: the flat positions and values where ``new / scale`` misses (an
    int32/int64 index and a copy of those elements), or a copy of ``t`` when that is smaller."""
    new = (t * scale).to(t.dtype)
    back = (new / scale).to(t.dtype)
    miss = (back != t).reshape(-1).nonzero().squeeze(1)        # NaN (0/0 for a zero l) counts
    index_dtype = torch.int32 if t.numel() < 2 ** 31 else torch.int64
    per_miss = torch.empty((), dtype=index_dtype).element_size() + t.element_size()
    if miss.numel() * per_miss >= t.numel() * t.element_size():
        return new, ("all", t.detach().clone())
    return new, ("some", miss.to(index_dtype), t.reshape(-1)[miss].clone())


def _unscaled(t: Tensor, scale: Tensor, restore: tuple) -> Tensor:
    """The tensor :func:`_scaled_with_restore` was given, from its scaled ``t``."""
    if restore[0] == "all":
        return restore[1].to(t.device, t.dtype)
    _, index, values = restore
    back = (t / scale.to(t.device)).to(t.dtype)
    back.view(-1)[index.to(t.device, torch.int64)] = values.to(t.device, t.dtype)
    return back


def ia3_layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    """``(name, layer)`` of every IA3 layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


# --------------------------------------------------------------------------------------------
# apply_ia3
# --------------------------------------------------------------------------------------------


def _feedforward_matcher(spec: str | list[str]) -> Callable[[str], bool]:
    """HF PEFT's test of a target's full name against ``feedforward_modules``: a regex must match
    the whole name, a list entry must end it (a plain string suffix)."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda name: pattern.fullmatch(name) is not None
    entries = list(spec)
    return lambda name: any(name.endswith(e) for e in entries)


def _plan(model: nn.Module, config: IA3Config) -> tuple[dict[str, bool], list[str]]:
    """``({target name: is_feedforward}, modules_to_save names)`` for ``config`` on ``model``,
    every argument checked against the model. Reads the model only."""
    kind = model_type(model)
    target_spec, defaulted = config.target_modules, config.target_modules is None
    if defaulted:
        if kind not in IA3_TARGET_MODULES:
            raise ValueError(
                f"target_modules was not given and IA3 has no default for model type {kind!r} "
                f"(defaults exist for {sorted(IA3_TARGET_MODULES)}); name the layers to adapt and "
                f"the feed-forward ones among them, e.g. target_modules=['k_proj', 'v_proj', "
                f"'down_proj'], feedforward_modules=['down_proj']. {describe_linear_modules(model)}")
        target_spec = IA3_TARGET_MODULES[kind]
    ff_spec = config.feedforward_modules
    if ff_spec is None:
        if kind not in IA3_FEEDFORWARD_MODULES:
            raise ValueError(
                f"feedforward_modules was not given and IA3 has no default for model type {kind!r}; "
                f"name the targets that scale their input (e.g. feedforward_modules=['down_proj']), "
                f"or pass feedforward_modules=[] if every target scales its output")
        ff_spec = IA3_FEEDFORWARD_MODULES[kind]
    if defaulted and isinstance(config.feedforward_modules, list):
        _check_subset(config.feedforward_modules, target_spec,
                      f"the default target_modules of model type {kind!r}")
    try:
        targets = find_targets(model, target_spec, config.exclude_modules, every_entry=not defaulted)
    except ValueError as err:
        if not defaulted:
            raise
        raise ValueError(f"target_modules was not given; IA3's default target_modules of model type "
                         f"{kind!r} is {target_spec!r}: {err}") from err
    saved = find_modules(model, config.modules_to_save, "modules_to_save") if config.modules_to_save else []
    explicit = not defaulted and config.target_modules != "all-linear"
    clash = sorted(set(targets) & set(saved)) if explicit else []
    if clash:
        raise ValueError(f"modules_to_save and target_modules both select {clash}; a module trained in "
                         f"full gets no IA3 vector")
    targets = [t for t in targets if not inside_any(t, saved)]
    if not targets:
        raise ValueError(f"every module target_modules={target_spec!r} selects is in "
                         f"modules_to_save={config.modules_to_save!r}, so nothing is left to adapt")
    is_ff = _feedforward_matcher(ff_spec)
    plan: dict[str, bool] = {}
    for name in targets:
        module = model.get_submodule(name)
        ff = is_ff(name)
        if isinstance(module, IA3Linear):
            if module.is_feedforward != ff:
                raise ValueError(
                    f"{name} already carries an IA3 vector that scales its "
                    f"{'input' if module.is_feedforward else 'output'}, but feedforward_modules="
                    f"{ff_spec!r} makes it scale its {'input' if ff else 'output'}")
        elif isinstance(module, AdapterLayer):
            raise ValueError(f"target_modules selects {name}, which already carries a "
                             f"{type(module).__name__}; IA3 does not wrap another method's layer")
        plan[name] = ff
    return plan, saved


def apply_ia3(model: nn.Module, target_modules: TargetSpec = None,
              feedforward_modules: str | Sequence[str] | None = None,
              exclude_modules: TargetSpec = None, modules_to_save: Sequence[str] | None = None,
              init_ia3_weights: bool = True, autocast_adapter_dtype: bool = True,
              config: IA3Config | None = None) -> nn.Module:
    """Inject (IA)³ into ``model`` in place, freeze everything else, and return ``model``.

    Arguments are the fields of :class:`IA3Config` (or pass ``config=`` alone). Without
    ``target_modules``/``feedforward_modules`` the architecture's defaults (HF PEFT's) are used.
    Layers that already carry IA3 are left as they are, so applying twice is harmless. The base
    modules and their ``Parameter`` objects are kept, not copied. A module listed in
    ``modules_to_save`` is trained in full and gets no vector inside it. Everything is checked
    before the model is changed.
    """
    keywords = {"target_modules": target_modules, "feedforward_modules": feedforward_modules,
                "exclude_modules": exclude_modules, "modules_to_save": modules_to_save,
                "init_ia3_weights": init_ia3_weights, "autocast_adapter_dtype": autocast_adapter_dtype}
    if config is None:
        config = IA3Config(**keywords)
    elif not isinstance(config, IA3Config):
        raise TypeError(f"config must be an IA3Config, got {type(config).__name__}")
    else:
        defaults = {"init_ia3_weights": True, "autocast_adapter_dtype": True}
        given = [k for k, v in keywords.items() if v is not defaults.get(k)]
        if given:
            raise ValueError(f"pass either config= or the keyword arguments, not both: {given} given "
                             f"beside config")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    plan, saved = _plan(model, config)
    for name, ff in plan.items():
        module = model.get_submodule(name)
        if isinstance(module, IA3Linear):
            continue
        parent, child = get_parent(model, name)
        setattr(parent, child, IA3Linear(module, is_feedforward=ff,
                                         init_ia3_weights=config.init_ia3_weights,
                                         autocast_adapter_dtype=config.autocast_adapter_dtype))
    wrap_modules_to_save(model, saved)
    freeze_all_but_adapters(model)
    return model


# --------------------------------------------------------------------------------------------
# Files (the registry entry's hooks)
# --------------------------------------------------------------------------------------------


def _entries(chosen: list[str], names: list[str], dotted: bool, full: bool) -> dict[str, str]:
    """``{module: entry}``: the leaf name where it selects exactly ``chosen`` among ``names`` (as a
    dotted suffix, or a plain suffix with ``dotted=False``), else the full name."""
    chosen_set = set(chosen)
    out = {}
    for name in chosen:
        leaf = name.rsplit(".", 1)[-1]
        hits = {n for n in names if n == leaf or (n.endswith("." + leaf) if dotted else n.endswith(leaf))}
        out[name] = leaf if not full and hits <= chosen_set else name
    return out


def _to_json(root: nn.Module) -> dict[str, Any]:
    """The IA3 fields of ``adapter_config.json`` (HF PEFT's IA3 config) describing the IA3 layers
    and the modules trained in full of ``root``."""
    layers = ia3_layers(root)
    if not layers:
        raise ValueError(f"{type(root).__name__} has no IA3 layers to save; inject them first with "
                         f"apply_ia3(model, ...)")
    if any(not name for name, _ in layers):
        raise ValueError("the model itself is an IA3Linear; save the model that contains it")
    free = names_outside_adapters(root)
    targets = [n for n, _ in layers]
    feedforward = {n for n, m in layers if m.is_feedforward}
    for full in (False, True):  # leaf names where they select exactly, else full names
        entry = _entries(targets, free, dotted=True, full=full)
        ff_entries = {entry[n] for n in feedforward}
        # HF PEFT tests a target against feedforward_modules as a plain suffix of its name
        if {n for n in targets if any(n.endswith(e) for e in ff_entries)} == feedforward:
            break
    else:
        raise ValueError(f"the feed-forward IA3 layers ({sorted(feedforward)}) cannot be told apart "
                         f"from the others by name, which adapter_config.json needs")
    saved = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    saved_entries = sorted(set(_entries(saved, free, dotted=False, full=False).values()))
    return {  # io adds peft_type, task_type, base_model_name_or_path, revision, inference_mode
        "target_modules": sorted(set(entry.values())),
        "feedforward_modules": sorted(ff_entries),
        "exclude_modules": None,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "modules_to_save": saved_entries or None,
        "init_ia3_weights": True,
    }


_STRING_FIELDS = ("task_type", "base_model_name_or_path", "revision", "peft_version")
_BOOL_FIELDS = ("inference_mode", "fan_in_fan_out", "init_ia3_weights")


def _config_from_json(model: nn.Module, config: dict[str, Any], where: str) -> IA3Config:
    """Check every field of an IA3 ``adapter_config.json`` (a ``ValueError`` naming the field and
    ``where``) and build the :class:`IA3Config` it describes for ``model``."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the config must be a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "IA3":
        raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}, not 'IA3'")
    for key in _STRING_FIELDS:
        if config.get(key) is not None and not isinstance(config[key], str):
            raise ValueError(f"{where}: {key} must be a string or null, got {config[key]!r}")
    for key in _BOOL_FIELDS:
        if key in config and not isinstance(config[key], bool):
            raise ValueError(f"{where}: {key} must be true or false (a JSON boolean), got {config[key]!r}")
    for key in ("target_modules", "exclude_modules", "feedforward_modules"):
        value = config.get(key)
        if value is None or isinstance(value, str):
            continue
        if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)) \
                or (not value and key != "feedforward_modules"):
            raise ValueError(f"{where}: {key} must be a list of module names, a regular expression "
                             f"string or null, got {value!r}")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) and s for s in saved)):
        raise ValueError(f"{where}: modules_to_save must be a list of module names or null, got {saved!r}")
    entries = peft_modules_to_save(model, saved)
    try:
        return IA3Config(target_modules=config.get("target_modules"),
                         feedforward_modules=config.get("feedforward_modules"),
                         exclude_modules=config.get("exclude_modules"),
                         modules_to_save=entries or None,
                         init_ia3_weights=config.get("init_ia3_weights", True))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    """Check ``config`` and plan its injection into ``model`` (read only); return the injection."""
    return planned_injection(model, _config_from_json(model, config, where), where, _plan, apply_ia3)


def _update_from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[], None]:
    """Loading into a model that already carries IA3: the fields are checked, and the layers they
    describe must be the model's (same targets, same feed-forward ones); the vectors are then all
    there is to load."""
    ia3 = _config_from_json(model, config, where)
    try:
        plan, _ = _plan(model, ia3)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    have = dict((n, m.is_feedforward) for n, m in ia3_layers(model))
    if plan != have:
        new, lacking = sorted(set(plan) - set(have)), sorted(set(have) - set(plan))
        raise ValueError(
            f"{where}: target_modules/feedforward_modules describe other IA3 layers than the model "
            f"carries" + (f"; not adapted in the model: {new[:5]}" if new else "")
            + (f"; adapted in the model but not in the file: {lacking[:5]}" if lacking else "")
            + ". Load it into a model without IA3 (it is then injected as the file describes).")
    return lambda: None


def _detect(model: nn.Module) -> bool:
    return any(isinstance(m, IA3Linear) for m in model.modules())


METHOD = register(Method(
    name="ia3",
    config_class=IA3Config,
    peft_type="IA3",
    apply=apply_ia3,
    detect=_detect,
    to_json=_to_json,
    from_json=_from_json,
    update_from_json=_update_from_json,
    bound_fields=("peft_type", "target_modules", "feedforward_modules", "exclude_modules",
                  "modules_to_save"),
))

__all__ = ["IA3Config", "IA3Linear", "IA3_FEEDFORWARD_MODULES", "IA3_TARGET_MODULES", "METHOD",
           "apply_ia3", "ia3_layers"]
