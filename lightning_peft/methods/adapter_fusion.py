"""AdapterFusion (Pfeiffer et al. 2021, arXiv 2005.00247): several trained bottleneck adapters,
frozen, combined at every site by a learned attention over their outputs.

At a site with output h (what a serial adapter reads) and N adapters whose updates are
a_n = s_n·a_n(x) (:func:`lightning_peft.methods.bottleneck.bottleneck_update`)::

    q = h·Qᵀ + b_Q             k_n = a_n·Kᵀ + b_K          v_n = a_n·Vᵀ
    p = softmax_n(q·k_n / T)                                    (per token, over the N adapters)
    h <- h + Σ_n p_n·v_n

Q, K (d, d) start as BERT's initialisation (normal, std 0.02) and V as the identity, so a fresh
fusion adds a softmax-weighted mix of the adapters' updates. Only Q, K, V (and the modules in
``trainable_modules``) train; the adapters are frozen buffers. Adapters of different bottleneck
widths are stacked zero-padded to the widest (exact: every activation maps 0 to 0).

The file (``peft_type: "ADAPTER_FUSION"``, ours) is self-contained: per site the fusion's
``fusion_query.weight``/``.bias``, ``fusion_key.weight``/``.bias``, ``fusion_value.weight`` and
the stacked adapters (``adapters_down`` (N, b, in), ``adapters_down_bias``, ``adapters_up``
(N, out, b), ``adapters_up_bias``, ``adapters_scaling`` (N,)); ``adapter_config.json`` names the
adapters, their widths, the sites, placement, activation and temperature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft._base import (
    AdapterLayer,
    ModulesToSave,
    freeze_all_but_adapters,
    inside_any,
    wrap_modules_to_save,
)
from lightning_peft.methods import Method, register
from lightning_peft.methods.bottleneck import (
    ACTIVATIONS,
    AdapterConfig,
    SiteLayer,
    _check_fields,
    _dims,
    _read_site,
    check_sites,
)
from lightning_peft.targeting import check_module_names, find_modules

_JSON_FIELDS = (
    "adapters",
    "bottlenecks",
    "placement",
    "activation",
    "temperature",
    "sites",
    "trainable_modules",
)


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


@dataclass
class AdapterFusionConfig:
    """What :func:`apply_adapter_fusion` injects."""

    adapter_dirs: list[str] | None = None
    """Directories of trained bottleneck adapters (``save_adapter`` of a model with
    ``apply_adapters``), at least two, all with the same sites, placement and activation."""
    temperature: float = 1.0
    """T dividing the attention scores (> 0)."""
    trainable_modules: list[str] | None = None
    """Modules trained in full beside the fusion (e.g. ``["classifier"]``, the task head)."""

    def __post_init__(self) -> None:
        if self.adapter_dirs is not None:
            if (
                isinstance(self.adapter_dirs, (str, Path))
                or not isinstance(self.adapter_dirs, (list, tuple))
                or not all(isinstance(d, (str, Path)) and str(d) for d in self.adapter_dirs)
            ):
                raise ValueError(
                    f"adapter_dirs must be a list of adapter directories, got {self.adapter_dirs!r}"
                )
            self.adapter_dirs = [str(d) for d in self.adapter_dirs]
            if len(self.adapter_dirs) < 2:
                raise ValueError(
                    f"adapter_dirs must name at least two adapters to fuse, got {self.adapter_dirs!r}"
                )
            if len(set(self.adapter_dirs)) != len(self.adapter_dirs):
                raise ValueError(f"adapter_dirs names a directory twice: {self.adapter_dirs!r}")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature <= 0
        ):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        self.trainable_modules = check_module_names(self.trainable_modules, "trainable_modules")


# --------------------------------------------------------------------------------------------
# 2. Module
# --------------------------------------------------------------------------------------------


class AdapterFusionLayer(SiteLayer):
    """N frozen bottleneck adapters at one site and the attention that mixes their updates."""

    def __init__(
        self,
        base_layer: nn.Module,
        in_features: int,
        out_features: int,
        bottlenecks: Sequence[int],
        activation: str,
        placement: str,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(base_layer, placement)
        self.activation, self.temperature = activation, temperature
        self.bottlenecks = [int(b) for b in bottlenecks]
        n, b, d = len(self.bottlenecks), max(self.bottlenecks), out_features
        ref = next(base_layer.parameters(), None)
        kw = {
            "dtype": ref.dtype if ref is not None and ref.is_floating_point() else None,
            "device": ref.device if ref is not None else None,
        }
        self.register_buffer("adapters_down", torch.zeros(n, b, in_features, **kw))  # (N, b, in)
        self.register_buffer("adapters_down_bias", torch.zeros(n, b, **kw))  # (N, b)
        self.register_buffer("adapters_up", torch.zeros(n, d, b, **kw))  # (N, out, b)
        self.register_buffer("adapters_up_bias", torch.zeros(n, d, **kw))  # (N, out)
        self.register_buffer("adapters_scaling", torch.ones(n, **kw))  # (N,)
        self.fusion_query = nn.Parameter(torch.empty(d, d, **kw))
        self.fusion_query_bias = nn.Parameter(torch.empty(d, **kw))
        self.fusion_key = nn.Parameter(torch.empty(d, d, **kw))
        self.fusion_key_bias = nn.Parameter(torch.empty(d, **kw))
        self.fusion_value = nn.Parameter(torch.empty(d, d, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.fusion_query.is_meta:
            return
        with torch.no_grad():
            nn.init.normal_(self.fusion_query, std=0.02)
            nn.init.normal_(self.fusion_key, std=0.02)
            self.fusion_query_bias.zero_()
            self.fusion_key_bias.zero_()
            self.fusion_value.copy_(torch.eye(self.fusion_value.shape[0]))

    def set_adapter(
        self, i: int, down: Tensor, down_bias: Tensor, up: Tensor, up_bias: Tensor, scaling: float
    ) -> None:
        """Copy adapter ``i``'s tensors in (zero-padded to the widest bottleneck)."""
        b = down.shape[0]
        with torch.no_grad():
            self.adapters_down[i].zero_()[:b].copy_(down)
            self.adapters_down_bias[i].zero_()[:b].copy_(down_bias)
            self.adapters_up[i].zero_()[:, :b].copy_(up)
            self.adapters_up_bias[i].copy_(up_bias)
            self.adapters_scaling[i] = scaling

    def adapter_updates(self, x: Tensor) -> Tensor:
        """The N adapters' updates s_n·a_n(x), stacked: (N, ..., out)."""
        x = x.to(self.adapters_down.dtype)
        z = torch.einsum("...i,nbi->n...b", x, self.adapters_down)  # (N, ..., b)
        shape = (z.shape[0],) + (1,) * (z.dim() - 2) + (z.shape[-1],)
        z = ACTIVATIONS[self.activation](z + self.adapters_down_bias.view(shape))
        a = torch.einsum("n...b,nob->n...o", z, self.adapters_up)  # (N, ..., out)
        a = a + self.adapters_up_bias.view(shape[:-1] + (-1,))
        return a * self.adapters_scaling.view(shape[:-1] + (1,))

    def update(self, x: Tensor, h: Tensor) -> Tensor:
        a = self.adapter_updates(x)  # (N, ..., d)
        q = F.linear(h.to(a.dtype), self.fusion_query, self.fusion_query_bias)  # (..., d)
        k = F.linear(a, self.fusion_key, self.fusion_key_bias)  # (N, ..., d)
        v = F.linear(a, self.fusion_value)  # (N, ..., d)
        p = torch.softmax((q.unsqueeze(0) * k).sum(-1) / self.temperature, dim=0)  # (N, ...)
        return (p.unsqueeze(-1) * v).sum(0)  # (..., d)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {
            "fusion_query": self.fusion_query,
            "fusion_query_bias": self.fusion_query_bias,
            "fusion_key": self.fusion_key,
            "fusion_key_bias": self.fusion_key_bias,
            "fusion_value": self.fusion_value,
        }

    def adapter_buffers(self) -> dict[str, Tensor]:
        return {
            n: getattr(self, n)
            for n in (
                "adapters_down",
                "adapters_down_bias",
                "adapters_up",
                "adapters_up_bias",
                "adapters_scaling",
            )
        }

    def file_key(self, name: str) -> str:
        if name.startswith("fusion_"):
            return name[:-5] + ".bias" if name.endswith("_bias") else name + ".weight"
        return name

    def extra_repr(self) -> str:
        return (
            f"adapters={len(self.bottlenecks)}, bottlenecks={self.bottlenecks}, placement={self.placement}, "
            f"activation={self.activation}, temperature={self.temperature}"
        )


# --------------------------------------------------------------------------------------------
# 3. apply_adapter_fusion
# --------------------------------------------------------------------------------------------


def _read_bottleneck(directory: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, tensors by file key without the prefix)`` of a saved bottleneck adapter."""
    from lightning_peft.io import ADAPTER_CONFIG_NAME, _read_adapter
    from lightning_peft.methods import get_method

    config, tensors, where = _read_adapter(directory)
    method = get_method("adapter")
    if config.get("peft_type") != method.peft_type:
        raise ValueError(
            f"adapter_dirs: {str(Path(directory) / ADAPTER_CONFIG_NAME)!r} holds a "
            f"{config.get('peft_type')!r} adapter; AdapterFusion fuses bottleneck adapters "
            f"({method.peft_type!r}, saved from apply_adapters)"
        )
    prefix = method.file_prefix
    return config, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _plan(model: nn.Module, config: AdapterFusionConfig) -> tuple[dict[str, Any], list[dict[str, Tensor]]]:
    """Read and check the adapters of ``config`` against ``model``: ``(fusion json fields, the
    adapters' tensors)``."""
    if not config.adapter_dirs:
        raise ValueError("adapter_dirs must name at least two trained bottleneck adapters to fuse")
    if any(isinstance(m, AdapterLayer) and not isinstance(m, ModulesToSave) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already carries adapters; AdapterFusion loads the adapters "
            f"it fuses into a model without any"
        )
    configs, tensors = [], []
    for directory in config.adapter_dirs:
        cfg, ten = _read_bottleneck(directory)
        configs.append(cfg)
        tensors.append(ten)
    first = configs[0]
    for key in ("placement", "activation", "sites"):
        values = [c.get(key) for c in configs]
        if any(v != values[0] for v in values):
            raise ValueError(
                f"adapter_dirs: the adapters differ in {key} ({dict(zip(config.adapter_dirs, values))}); "
                f"AdapterFusion fuses adapters at the same sites with the same placement and "
                f"activation"
            )
    sites = check_sites(model, first["sites"], f"adapter_dirs[0] ({config.adapter_dirs[0]})")
    fields = {
        "adapters": [Path(d).name for d in config.adapter_dirs],
        "bottlenecks": [int(c["bottleneck"]) for c in configs],
        "placement": first["placement"],
        "activation": first["activation"],
        "temperature": config.temperature,
        "sites": sites,
        "trainable_modules": config.trainable_modules,
        "scalings": [float(c["scaling"]) for c in configs],
    }
    _check_plan(model, fields)
    for i, (directory, cfg) in enumerate(zip(config.adapter_dirs, configs)):
        # a source adapter's own task head (its trainable_modules) is not fused: the fusion trains
        # the heads of its own trainable_modules
        heads = [n for e in (cfg.get("trainable_modules") or []) if isinstance(e, str)
                 for n, _ in model.named_modules() if n and (n == e or n.endswith("." + e))]
        ten = tensors[i] = {k: v for k, v in tensors[i].items() if not inside_any(k, heads)}
        want = {
            f"{w}.{k}"
            for w in sites
            for k in ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
        }
        if set(ten) != want:
            raise ValueError(
                f"adapter_dirs: {directory!r} does not hold exactly the tensors of its sites "
                f"(missing {sorted(want - set(ten))[:3]}, unexpected {sorted(set(ten) - want)[:3]}; "
                f"besides its sites' adapters a source adapter may hold its trainable_modules, which "
                f"are not fused)"
            )
        for write, read in sites.items():
            inp, out = _dims(model, write, read, first["placement"])
            shapes = {
                "adapter_down.weight": (cfg["bottleneck"], inp),
                "adapter_down.bias": (cfg["bottleneck"],),
                "adapter_up.weight": (out, cfg["bottleneck"]),
                "adapter_up.bias": (out,),
            }
            for key, shape in shapes.items():
                t = ten[f"{write}.{key}"]
                if tuple(t.shape) != shape or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"adapter_dirs: {directory!r}: {write}.{key} has shape {tuple(t.shape)} "
                        f"(dtype {t.dtype}); the model needs finite floats of shape {shape}"
                    )
    return fields, tensors


def _check_plan(model: nn.Module, fields: dict[str, Any]) -> None:
    if fields["trainable_modules"]:
        find_modules(model, fields["trainable_modules"], "trainable_modules")
    for write, read in fields["sites"].items():
        _dims(model, write, read, fields["placement"])


def _inject(model: nn.Module, fields: dict[str, Any], tensors: list[dict[str, Tensor]] | None) -> None:
    trainable = (
        find_modules(model, fields["trainable_modules"], "trainable_modules")
        if fields["trainable_modules"]
        else []
    )
    wrap_modules_to_save(model, trainable)
    scalings = fields.get("scalings") or [1.0] * len(fields["bottlenecks"])
    for write, read in fields["sites"].items():
        module = model.get_submodule(write)
        if isinstance(module, AdapterFusionLayer):
            continue
        inp, out = _dims(model, write, read, fields["placement"])
        layer = AdapterFusionLayer(
            module,
            inp,
            out,
            fields["bottlenecks"],
            fields["activation"],
            fields["placement"],
            fields["temperature"],
        )
        if tensors is not None:
            for i, ten in enumerate(tensors):
                layer.set_adapter(
                    i,
                    ten[f"{write}.adapter_down.weight"],
                    ten[f"{write}.adapter_down.bias"],
                    ten[f"{write}.adapter_up.weight"],
                    ten[f"{write}.adapter_up.bias"],
                    scalings[i],
                )
        layer.names = list(fields["adapters"])
        parent_name, _, child = write.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        if read != write:
            layer.tap(model.get_submodule(read))
    freeze_all_but_adapters(model)


def apply_adapter_fusion(
    model: nn.Module,
    adapter_dirs: Sequence[str] | None = None,
    temperature: float = 1.0,
    trainable_modules: Sequence[str] | None = None,
    config: AdapterFusionConfig | None = None,
) -> nn.Module:
    """Load the bottleneck adapters saved in ``adapter_dirs`` into ``model`` (frozen) and add a
    trainable fusion at every site; freeze everything else; return ``model``. Every directory is
    read and checked (same sites, placement and activation; tensors that fit the model) before
    the model changes. The adapters' module paths are those of the transformers model inside
    ``model`` (a LightningModule holding one works too), as in their files. A model that already
    carries this fusion is returned as it is."""
    if config is None:
        config = AdapterFusionConfig(
            adapter_dirs=adapter_dirs,
            temperature=temperature,
            trainable_modules=trainable_modules,
        )
    elif not isinstance(config, AdapterFusionConfig):
        raise TypeError(f"config must be an AdapterFusionConfig, got {type(config).__name__}")
    existing = next((m for m in model.modules() if isinstance(m, AdapterFusionLayer)), None)
    if existing is not None:  # the same fusion again is harmless; another one is refused
        have = {"adapters": list(existing.names), "temperature": existing.temperature}
        want = {"adapters": [Path(d).name for d in config.adapter_dirs or []] or have["adapters"],
                "temperature": config.temperature}
        differ = [k for k in have if have[k] != want[k]]
        if differ:
            raise ValueError(f"the model already carries an AdapterFusion of "
                             f"{', '.join(f'{k}={have[k]!r}' for k in differ)}; "
                             f"{', '.join(f'{k}={want[k]!r}' for k in differ)} describe another. Fusions "
                             f"do not stack: use a fresh model")
        return model
    from lightning_peft.io import _transformers_root

    _, root = _transformers_root(model)  # the files' module paths are relative to it
    fields, tensors = _plan(root, config)
    _inject(root, fields, tensors)
    return model


# --------------------------------------------------------------------------------------------
# 4. Registry entry
# --------------------------------------------------------------------------------------------


def fusion_to_json(root: nn.Module) -> dict[str, Any]:
    layers = {n: m for n, m in root.named_modules() if isinstance(m, AdapterFusionLayer)}
    if not layers:
        raise ValueError(
            f"{type(root).__name__} carries no AdapterFusion; apply_adapter_fusion(model, dirs) first"
        )
    first = next(iter(layers.values()))
    trainable = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    return {
        "adapters": list(first.names),
        "bottlenecks": first.bottlenecks,
        "placement": first.placement,
        "activation": first.activation,
        "temperature": first.temperature,
        "sites": {n: _read_site(root, n, m) for n, m in layers.items()},
        "trainable_modules": trainable or None,
    }


def fusion_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    """Check an ADAPTER_FUSION config against ``model``; ``inject`` builds the fusion layers (the
    adapters' tensors come from the file)."""
    fields = _fields(model, cfg, where)
    return lambda target: _inject(target, fields, None)


def _fields(model: nn.Module, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    _check_fields(cfg, where, _JSON_FIELDS)
    for key in _JSON_FIELDS[:-1]:
        if key not in cfg:
            raise ValueError(f"{where}: {key} is missing")
    names, widths = cfg["adapters"], cfg["bottlenecks"]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: adapters must list the names of at least two adapters, got {names!r}")
    if (
        not isinstance(widths, list)
        or len(widths) != len(names)
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in widths)
    ):
        raise ValueError(f"{where}: bottlenecks must list one positive integer per adapter, got {widths!r}")
    try:
        AdapterConfig(placement=cfg["placement"], activation=cfg["activation"])
        AdapterFusionConfig(temperature=cfg["temperature"], trainable_modules=cfg.get("trainable_modules"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    fields = {
        "adapters": names,
        "bottlenecks": widths,
        "placement": cfg["placement"],
        "activation": cfg["activation"],
        "temperature": float(cfg["temperature"]),
        "sites": check_sites(model, cfg["sites"], where),
        "trainable_modules": cfg.get("trainable_modules"),
    }
    try:
        _check_plan(model, fields)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return fields


def fusion_update_from_json(model: nn.Module, cfg: dict[str, Any], where: str) -> Callable[[], None]:
    fields = _fields(model, cfg, where)
    carried = fusion_to_json(model)
    for key in ("bottlenecks", "placement", "activation", "temperature", "sites"):
        if fields[key] != carried[key]:
            raise ValueError(
                f"{where}: {key} is {fields[key]!r}, but the model carries a fusion with "
                f"{key}={carried[key]!r}; load it into a fresh model instead"
            )
    return lambda: None


def _detect(model: nn.Module) -> bool:
    return any(isinstance(m, AdapterFusionLayer) for m in model.modules())


METHOD = register(
    Method(
        name="adapter_fusion",
        config_class=AdapterFusionConfig,
        peft_type="ADAPTER_FUSION",
        apply=lambda model, config: apply_adapter_fusion(model, config=config),
        detect=_detect,
        to_json=fusion_to_json,
        from_json=fusion_from_json,
        update_from_json=fusion_update_from_json,
        bound_fields=("peft_type", "bottlenecks", "placement", "activation", "temperature", "sites"),
    )
)

__all__ = ["AdapterFusionConfig", "AdapterFusionLayer", "apply_adapter_fusion"]
