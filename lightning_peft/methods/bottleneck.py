"""Bottleneck adapters: serial (Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al. 2021,
arXiv 2005.00247) and parallel (He et al. 2022, arXiv 2110.04366).

A small two-layer network with a bottleneck of width b adds an update to a sublayer's output::

    a(x) = f(x·W_downᵀ + b_down)·W_upᵀ + b_up        W_down (b, in), W_up (out, b), f the activation

    serial   (Houlsby):   h <- h + a(h)        h: the sublayer's output (attention output
                                               projection, feed-forward output), before its
                                               residual connection and layer norm
    parallel (He et al.): h <- h + s·a(x)      x: the sublayer's input, read beside it

``config="houlsby"`` adapts the attention block and the feed-forward block of every layer,
``"pfeiffer"`` only the feed-forward block. W_up and b_up start at zero, so a fresh adapter
leaves the model's outputs bit-identical; W_down starts as ``nn.Linear``'s default. Adapters are
nonlinear: they cannot merge into the weights, so they cost inference time (see
``benchmarks/adapter_latency.py``).

Where the adapters go, per transformer block (found by structure: Llama-like, GPT-2, BERT family,
DistilBERT, T5 blocks), or the modules named in ``target_modules`` (serial: on their output;
parallel: reading their input, adding to their output)::

                    serial: wraps (reads its output)   parallel: reads the input of -> adds to output of
    Llama     attn  self_attn.o_proj                   self_attn -> self_attn
              ffn   mlp.down_proj                      mlp -> mlp
    GPT-2     attn  attn.c_proj                        attn -> attn
              ffn   mlp.c_proj                         mlp -> mlp
    BERT      attn  attention.output.dense             attention.self -> attention.output.dense
              ffn   output.dense                       intermediate -> output.dense
    T5        attn  layer.0.SelfAttention.o            layer.0.SelfAttention -> same
              ffn   layer.-1.DenseReluDense.wo         layer.-1.DenseReluDense -> same

The adapter file (``peft_type: "BOTTLENECK"``, ours) holds each adapter's four tensors as
``<path>.adapter_down.weight``, ``.adapter_down.bias``, ``.adapter_up.weight``,
``.adapter_up.bias`` (``<path>``: the module whose output the adapter adds to) and
``adapter_config.json`` the sites (``{module adding the update: module read}``), the bottleneck,
placement, activation and scaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    _matcher,
    check_every_entry,
    check_module_names,
    check_module_spec,
    conv1d_class,
    find_modules,
    is_linear_like,
)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
"""Activations by name; each maps 0 to 0 (AdapterFusion pads bottlenecks with zeros)."""
PLACEMENTS = ("serial", "parallel")
CONFIGS = ("houlsby", "pfeiffer")

# per block family: (attention, feed-forward) sites, each (serial module, parallel read, parallel
# write), relative to the block; candidates separated by "|" (T5's decoder has its FF at layer.2)
_FAMILIES: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {
    "llama": (("self_attn.o_proj", "self_attn", "self_attn"), ("mlp.down_proj", "mlp", "mlp")),
    "gpt2": (("attn.c_proj", "attn", "attn"), ("mlp.c_proj", "mlp", "mlp")),
    "bert": (("attention.output.dense", "attention.self", "attention.output.dense"),
             ("output.dense", "intermediate", "output.dense")),
    "distilbert": (("attention.out_lin", "attention", "attention"), ("ffn.lin2", "ffn", "ffn")),
    "t5": (("layer.0.SelfAttention.o", "layer.0.SelfAttention", "layer.0.SelfAttention"),
           ("layer.2.DenseReluDense.wo|layer.1.DenseReluDense.wo",
            "layer.2.DenseReluDense|layer.1.DenseReluDense",
            "layer.2.DenseReluDense|layer.1.DenseReluDense")),
}

_JSON_FIELDS = ("bottleneck", "placement", "config", "activation", "scaling", "sites", "trainable_modules")


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


@dataclass
class AdapterConfig:
    """What :func:`apply_adapters` injects."""

    bottleneck: int = 64
    """Width b of the bottleneck (Houlsby et al. use 64; Pfeiffer et al. a reduction factor of
    16: hidden size / 16)."""
    placement: str = "serial"
    """``"serial"``: on the sublayer's output (h + a(h)); ``"parallel"``: beside the sublayer,
    reading its input (h + s·a(x))."""
    config: str | None = None
    """Which sublayers of each block: ``"houlsby"`` (attention and feed-forward; the default) or
    ``"pfeiffer"`` (feed-forward only). Not used with ``target_modules``."""
    activation: str = "relu"
    """The bottleneck's nonlinearity: one of :data:`ACTIVATIONS`."""
    scaling: float = 1.0
    """s, multiplying the adapter's update (He et al. use 4.0 for the parallel feed-forward
    adapter)."""
    target_modules: str | list[str] | None = None
    """Plain modules to adapt instead of the default block placements: names (exact or dotted
    suffix) or a regex (full match). Serial adapters read such a module's output, parallel ones
    its input; both add to its output."""
    trainable_modules: list[str] | None = None
    """Modules trained in full as trainable copies (e.g. ``["classifier"]``, the task head)."""

    def __post_init__(self) -> None:
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"bottleneck must be a positive integer (the adapter's width, e.g. 64), got "
                             f"{self.bottleneck!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.config is not None and self.config not in CONFIGS:
            raise ValueError(f"config must be one of {list(CONFIGS)} (or None: 'houlsby'), got "
                             f"{self.config!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) \
                or not math.isfinite(self.scaling) or self.scaling == 0:
            raise ValueError(f"scaling must be a finite nonzero number, got {self.scaling!r}")
        self.scaling = float(self.scaling)
        self.target_modules = check_module_spec(self.target_modules, "target_modules")
        if self.target_modules == "all-linear":
            raise ValueError("target_modules='all-linear' is not an adapter placement; name the modules "
                             "whose outputs get an adapter, or leave it None for the block placements")
        if self.target_modules is not None and self.config is not None:
            raise ValueError(f"config={self.config!r} chooses the block placements; with target_modules "
                             f"the adapters go on the named modules: pass one of the two")
        self.trainable_modules = check_module_names(self.trainable_modules, "trainable_modules")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# 2. Modules
# --------------------------------------------------------------------------------------------


def bottleneck_update(x: Tensor, down: Tensor, down_bias: Tensor, up: Tensor, up_bias: Tensor,
                      activation: str) -> Tensor:
    """a(x) = f(x·W_downᵀ + b_down)·W_upᵀ + b_up, computed in the adapter's dtype."""
    z = ACTIVATIONS[activation](F.linear(x.to(down.dtype), down, down_bias))  # (..., b)
    return F.linear(z, up, up_bias)  # (..., out)


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"an adapted module must return a tensor or a tuple starting with one, got "
                    f"{type(out).__name__}")


def _replace_first(out: Any, value: Tensor) -> Any:
    if isinstance(out, Tensor):
        return value
    if isinstance(out, tuple):
        return (value, *out[1:])
    if isinstance(out, list):
        return [value, *out[1:]]
    out.last_hidden_state = value
    return out


def _input_of(args: tuple, kwargs: dict) -> Tensor:
    """A module call's main input: its first positional tensor, ``hidden_states``, or its first
    tensor keyword argument."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"]
    for value in kwargs.values():
        if isinstance(value, Tensor):
            return value
    raise TypeError("the module an adapter reads was called without a tensor input")


class SiteLayer(WrapperLayer):
    """An adapter site: wraps the module whose output gets the update (``base_layer``) and reads
    either that output (serial), that module's input (parallel, ``read`` is the same module) or
    the input of another module that runs earlier in the block (parallel on BERT: the
    feed-forward's ``intermediate``), recorded by a forward pre-hook on it."""

    no_merge = "a nonlinear adapter"

    def __init__(self, base_layer: nn.Module, placement: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.placement = placement
        self.taps = False

    def tap(self, module: nn.Module) -> None:
        """Read the input of ``module`` (another module that runs before this one)."""
        module.register_forward_pre_hook(self._record, with_kwargs=True)
        self.taps = True

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.__dict__["_tapped"] = _input_of(args, kwargs)

    def update(self, x: Tensor, h: Tensor) -> Tensor:
        """The term added to the output ``h``, from the read tensor ``x``."""
        raise TypeError(f"{type(self).__name__} must define update()")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        h = _first_tensor(out)
        if self.placement == "serial":
            x = h
        elif self.taps:
            x = self.__dict__.pop("_tapped", None)
            if x is None:
                raise RuntimeError(f"{type(self).__name__}: the module this parallel adapter reads did not "
                                   f"run before the one it adds to")
        else:
            x = _input_of(args, kwargs)
        update = self.update(x, h)
        if update.shape[-1] != h.shape[-1]:  # never broadcast a narrower update over the output
            raise ValueError(f"{type(self).__name__}: the update has {update.shape[-1]} features but the "
                             f"output it is added to has {h.shape[-1]}")
        return _replace_first(out, h + update.to(h.dtype))


class BottleneckAdapter(SiteLayer):
    """``h + s·a(x)`` around ``base_layer`` (see the module docstring); W_up, b_up start at zero."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, bottleneck: int,
                 activation: str, placement: str, scaling: float = 1.0) -> None:
        super().__init__(base_layer, placement)
        self.activation, self.scaling = activation, scaling
        ref = next(base_layer.parameters(), None)
        kw = {"dtype": ref.dtype if ref is not None and ref.is_floating_point() else None,
              "device": ref.device if ref is not None else None}
        self.adapter_down = nn.Parameter(torch.empty(bottleneck, in_features, **kw))  # (b, in)
        self.adapter_down_bias = nn.Parameter(torch.empty(bottleneck, **kw))  # (b,)
        self.adapter_up = nn.Parameter(torch.empty(out_features, bottleneck, **kw))  # (out, b)
        self.adapter_up_bias = nn.Parameter(torch.empty(out_features, **kw))  # (out,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.adapter_down.is_meta:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5))  # nn.Linear's default
            bound = 1 / math.sqrt(self.adapter_down.shape[1])
            nn.init.uniform_(self.adapter_down_bias, -bound, bound)
            self.adapter_up.zero_()
            self.adapter_up_bias.zero_()

    def update(self, x: Tensor, h: Tensor) -> Tensor:
        a = bottleneck_update(x, self.adapter_down, self.adapter_down_bias, self.adapter_up,
                              self.adapter_up_bias, self.activation)
        return a if self.scaling == 1.0 else a * self.scaling

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"adapter_down": self.adapter_down, "adapter_down_bias": self.adapter_down_bias,
                "adapter_up": self.adapter_up, "adapter_up_bias": self.adapter_up_bias}

    def file_key(self, name: str) -> str:
        return {"adapter_down": "adapter_down.weight", "adapter_down_bias": "adapter_down.bias",
                "adapter_up": "adapter_up.weight", "adapter_up_bias": "adapter_up.bias"}[name]

    def extra_repr(self) -> str:
        return (f"placement={self.placement}, bottleneck={self.adapter_down.shape[0]}, "
                f"activation={self.activation}, scaling={self.scaling}")


# --------------------------------------------------------------------------------------------
# 3. apply_adapters
# --------------------------------------------------------------------------------------------


def in_features(module: nn.Module) -> int | None:
    """Input width of a linear layer, or of the first linear layer inside a container."""
    return _width(module, first=True)


def out_features(module: nn.Module) -> int | None:
    """Output width of a linear layer, or of the last linear layer inside a container."""
    return _width(module, first=False)


def _width(module: nn.Module, first: bool) -> int | None:
    conv1d = conv1d_class()
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)
              or (conv1d is not None and isinstance(m, conv1d))]
    if not layers:
        return None
    layer = layers[0] if first else layers[-1]
    if isinstance(layer, nn.Linear):
        return layer.in_features if first else layer.out_features
    return layer.weight.shape[0] if first else layer.weight.shape[1]  # Conv1D: (in, out)


def default_sites(model: nn.Module, config: str = "houlsby", placement: str = "serial") -> dict[str, str]:
    """``{module the update is added to: module read}`` for every transformer block of ``model``
    (Llama-like, GPT-2, BERT family, DistilBERT, T5), by structure; a ``ValueError`` listing the
    families when no block is recognised."""
    modules = dict(model.named_modules())
    blocks = [f"{n}.{i}" for n, m in modules.items() if isinstance(m, nn.ModuleList) for i in range(len(m))]

    def resolve(block: str, candidates: str) -> str | None:
        for rel in candidates.split("|"):
            if f"{block}.{rel}" in modules:
                return f"{block}.{rel}"
        return None

    sites: dict[str, str] = {}
    for block in blocks:
        for sublayers in _FAMILIES.values():
            wanted = sublayers if config == "houlsby" else sublayers[1:]
            found = []
            for serial, read, write in wanted:
                w = resolve(block, serial if placement == "serial" else write)
                r = w if placement == "serial" else resolve(block, read)
                found.append((w, r))
            if all(w is not None and r is not None for w, r in found):
                sites.update({w: r for w, r in found})
                break
    if not sites:
        raise ValueError(f"no transformer block of {type(model).__name__} has a known layout "
                         f"({sorted(_FAMILIES)}); name the modules to adapt with target_modules")
    return sites


def adapter_sites(model: nn.Module, config: AdapterConfig) -> dict[str, str]:
    """The sites ``config`` gives on ``model`` (checked, read only): ``{write: read}``."""
    adapters = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if config.target_modules is None:
        sites = default_sites(model, config.config or "houlsby", config.placement)
    else:
        match = _matcher(config.target_modules, "target_modules")
        check_every_entry(model, config.target_modules, "target_modules")
        sites = {n: n for n, _ in model.named_modules()
                 if n and match(n) and not any(n.startswith(a + ".") for a in adapters)}
        if not sites:
            top = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and
                          out_features(m) is not None})
            raise ValueError(f"target_modules={config.target_modules!r} matches no module of "
                             f"{type(model).__name__}; module names with linear layers: {top}")
    trainable = find_modules(model, config.trainable_modules, "trainable_modules") \
        if config.trainable_modules else []
    clash = [w for w in sites if inside_any(w, trainable)]
    if clash:
        raise ValueError(f"trainable_modules={config.trainable_modules!r} contains adapter sites "
                         f"{clash[:4]}; a module trained in full needs no adapter")
    nested = [w for w in sites if any(w.startswith(o + ".") for o in sites)]
    if nested:
        raise ValueError(f"target_modules selects modules inside other selected ones: {nested[:4]}")
    return sites


def _dims(model: nn.Module, write: str, read: str, placement: str) -> tuple[int, int]:
    base = model.get_submodule(write)
    base = base.base_layer if isinstance(base, SiteLayer) else base
    out = out_features(base)
    src = model.get_submodule(read)
    src = src.base_layer if isinstance(src, SiteLayer) else src
    inp = out if placement == "serial" else in_features(src)
    if out is None or inp is None:
        raise ValueError(f"cannot tell the width of {write!r} ({type(base).__name__}): an adapter site "
                         f"must be a linear layer or contain one")
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    if not is_linear_like(base) and isinstance(hidden, int) and out != hidden:
        # a block's output is the hidden size; its last linear layer is not always the output
        # projection (Qwen2-MoE's mlp ends with shared_expert_gate, hidden -> 1)
        raise ValueError(f"cannot tell the width of {write!r} ({type(base).__name__}): its last linear "
                         f"layer gives {out} features, not the model's hidden size {hidden} (a "
                         f"mixture-of-experts block, or a gate after the projection); choose sites "
                         f"whose last linear layer is the output projection")
    return inp, out


def _inject(model: nn.Module, sites: dict[str, str], config: AdapterConfig) -> None:
    trainable = find_modules(model, config.trainable_modules, "trainable_modules") \
        if config.trainable_modules else []
    wrap_modules_to_save(model, trainable)
    for write, read in sites.items():
        module = model.get_submodule(write)
        if isinstance(module, BottleneckAdapter):
            continue
        inp, out = _dims(model, write, read, config.placement)
        layer = BottleneckAdapter(module, inp, out, config.bottleneck, config.activation,
                                  config.placement, config.scaling)
        parent_name, _, child = write.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        if read != write:
            layer.tap(model.get_submodule(read))
    freeze_all_but_adapters(model)


def apply_adapters(model: nn.Module, bottleneck: int = 64, placement: str = "serial", config: Any = None,
                   activation: str = "relu", scaling: float = 1.0, target_modules: TargetSpec = None,
                   trainable_modules: Sequence[str] | None = None) -> nn.Module:
    """Insert bottleneck adapters into ``model`` in place, freeze everything else, return it.

    ``config`` is ``"houlsby"`` (attention and feed-forward of every block, the default),
    ``"pfeiffer"`` (feed-forward only), or an :class:`AdapterConfig` (then the other arguments
    are ignored). Everything is checked before the model changes; applying twice is harmless.
    """
    if isinstance(config, AdapterConfig):
        cfg = config
    else:
        cfg = AdapterConfig(bottleneck=bottleneck, placement=placement, config=config, activation=activation,
                            scaling=scaling, target_modules=target_modules,
                            trainable_modules=trainable_modules)
    existing = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    if existing and existing[0].placement != cfg.placement:
        raise ValueError(f"the model already carries {existing[0].placement} adapters; placement="
                         f"{cfg.placement!r} cannot be added to them")
    if existing:  # one setting per model (one adapter file holds one): a differing one is refused
        have = {"bottleneck": existing[0].adapter_down.shape[0], "activation": existing[0].activation,
                "scaling": existing[0].scaling}
        want = {"bottleneck": cfg.bottleneck, "activation": cfg.activation, "scaling": cfg.scaling}
        differ = [k for k in have if have[k] != want[k]]
        if differ:
            raise ValueError(f"the model already carries adapters with "
                             f"{', '.join(f'{k}={have[k]!r}' for k in differ)}; "
                             f"{', '.join(f'{k}={want[k]!r}' for k in differ)} cannot be added to them "
                             f"(one setting per model: apply the same values, or use a fresh model)")
    sites = adapter_sites(model, cfg)
    for write, read in sites.items():
        if not isinstance(model.get_submodule(write), BottleneckAdapter):
            _dims(model, write, read, cfg.placement)
    _inject(model, sites, cfg)
    return model


# --------------------------------------------------------------------------------------------
# 4. Registry entry
# --------------------------------------------------------------------------------------------


def adapters_to_json(root: nn.Module) -> dict[str, Any]:
    """``adapter_config.json`` fields of the bottleneck adapters of ``root``, read from its layers."""
    layers = {n: m for n, m in root.named_modules() if isinstance(m, BottleneckAdapter)}
    if not layers:
        raise ValueError(f"{type(root).__name__} carries no bottleneck adapter; apply_adapters(model) first")
    first = next(iter(layers.values()))
    kinds = {(m.adapter_down.shape[0], m.placement, m.activation, m.scaling) for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError(f"the model's adapters differ in bottleneck/placement/activation/scaling ({kinds}); "
                         f"one adapter file holds one setting")
    sites = {}
    for name, layer in layers.items():
        sites[name] = _read_site(root, name, layer)
    trainable = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    return {"bottleneck": int(first.adapter_down.shape[0]), "placement": first.placement, "config": None,
            "activation": first.activation, "scaling": first.scaling, "sites": sites,
            "trainable_modules": trainable or None}


def _read_site(root: nn.Module, name: str, layer: SiteLayer) -> str:
    """The module a site reads: itself, or the module whose pre-hook records into it."""
    if not layer.taps:
        return name
    for other, module in root.named_modules():
        for hook in module._forward_pre_hooks.values():
            if getattr(hook, "__self__", None) is layer:
                return other
    raise ValueError(f"the parallel adapter at {name!r} reads a module that is not part of the model")


def check_sites(model: nn.Module, sites: Any, where: str, key: str = "sites") -> dict[str, str]:
    """``sites`` of a config file checked against ``model``: a non-empty JSON object of module
    names, each present (or already wrapped) and not nested in another."""
    if not isinstance(sites, dict) or not sites or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in sites.items()):
        raise ValueError(f"{where}: {key} must be a non-empty object {{module the update is added to: "
                         f"module read}}, got {sites!r}")
    modules = dict(model.named_modules())
    absent = [n for pair in sites.items() for n in pair if n not in modules]
    if absent:
        raise ValueError(f"{where}: {key} names modules {type(model).__name__} does not have: "
                         f"{sorted(set(absent))[:6]}")
    return dict(sites)


def _check_fields(cfg: dict[str, Any], where: str, allowed: Sequence[str]) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: the config must be a JSON object, got {type(cfg).__name__}")
    common = ("peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode")
    unknown = sorted(k for k in cfg if k not in (*allowed, *common))
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; the config holds {list(allowed)}")


def _config_from_json(cfg: dict[str, Any], where: str) -> AdapterConfig:
    _check_fields(cfg, where, _JSON_FIELDS)
    for key in ("bottleneck", "placement", "activation", "scaling", "sites"):
        if key not in cfg:
            raise ValueError(f"{where}: {key} is missing")
    try:
        return AdapterConfig(bottleneck=cfg["bottleneck"], placement=cfg["placement"],
                             activation=cfg["activation"], scaling=cfg["scaling"],
                             trainable_modules=cfg.get("trainable_modules"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def adapters_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    """Check a BOTTLENECK ``adapter_config.json`` against ``model`` and return ``inject(model)``."""
    config = _config_from_json(cfg, where)
    sites = check_sites(model, cfg["sites"], where)

    try:
        if config.trainable_modules:
            find_modules(model, config.trainable_modules, "trainable_modules")
        for write, read in sites.items():
            _dims(model, write, read, config.placement)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return lambda target: _inject(target, sites, config)


def adapters_update_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[], None]:
    """A model that carries adapters takes only a file of the same adapters."""
    config = _config_from_json(cfg, where)
    carried = adapters_to_json(model)
    given = {**asdict(config), "sites": cfg["sites"], "config": None,
             "trainable_modules": config.trainable_modules}
    for key in ("bottleneck", "placement", "activation", "scaling", "sites", "trainable_modules"):
        if given[key] != carried[key]:
            raise ValueError(f"{where}: {key} is {given[key]!r}, but the model carries adapters with "
                             f"{key}={carried[key]!r}; load it into a fresh model instead")
    return lambda: None


def _detect(model: nn.Module) -> bool:
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())


METHOD = register(Method(
    name="adapter",
    config_class=AdapterConfig,
    peft_type="BOTTLENECK",
    apply=lambda model, config: apply_adapters(model, config=config),
    detect=_detect,
    to_json=adapters_to_json,
    from_json=adapters_from_json,
    update_from_json=adapters_update_from_json,
    aliases=("bottleneck", "adapters"),
))

__all__ = ["AdapterConfig", "BottleneckAdapter", "apply_adapters", "bottleneck_update", "default_sites"]
