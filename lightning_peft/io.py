"""Adapter state dicts and adapter files in HF PEFT's format (safetensors + JSON, never pickle).

A directory written by :func:`save_adapter` is what ``PeftModel.save_pretrained`` writes, so
``PeftModel.from_pretrained(base, directory)`` loads it, and :func:`load_adapter` loads
directories HF PEFT wrote:

- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
  ``rank_pattern``/``alpha_pattern`` (per-layer ranks and alphas), ``use_rslora``, ``bias``,
  ``modules_to_save``, ... The model is self-describing: the config is rebuilt from its layers.
- ``adapter_model.safetensors``: for a module at ``<path>`` of the transformers model,
  ``base_model.model.<path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r); a module
  trained in full (``modules_to_save``) as ``base_model.model.<path>.<param>``; trainable biases
  as ``base_model.model.<path>.bias`` (``<path>.base_layer.bias`` for an adapted layer).

``<path>`` is relative to the transformers model: when ``model`` wraps one (a LightningModule, a
DDP or compiled wrapper), the outermost ``PreTrainedModel`` holding every adapter layer is the
root; otherwise ``model`` itself is.

Loading is all or nothing: names and shapes are checked against the model (against a copy of
its structure on the meta device when the adapter still has to be injected) before anything is
changed; on a mismatch a ``ValueError`` names the missing, unexpected and mis-shaped tensors and
the model is left exactly as it was.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._base import (
    TRAIN_BIAS_ATTR,
    AdapterLayer,
    adapter_named_parameters,
    has_adapters,
)
from lightning_peft.lora import LoRAConfig, LoRALinear, ModulesToSave, apply_lora, lora_scaling
from lightning_peft.targeting import find_modules, find_targets

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# PEFT options this package does not implement: loading a file that uses one would silently give
# a different model, so it is refused. A falsy value (None, False, [], {}) means "not used".
_UNSUPPORTED_OPTIONS = (
    "use_dora", "lora_bias", "layers_to_transform", "layers_pattern", "layer_replication",
    "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "use_qalora",
    "use_bdlora", "megatron_config", "arrow_config",
)
# ``init_lora_weights`` values whose adapter is a plain LoRA on the unchanged base model (PiSSA,
# OLoRA, CorDA, LoftQ, ... rewrite the base weights, so their raw adapters do not apply to it).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


# --------------------------------------------------------------------------------------------
# Adapter state dicts (names as in the model; what the Lightning callback checkpoints)
# --------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor of ``model`` (LoRA ``A``/``B``, modules trained in full, trainable
    biases), keyed by its name in ``model.state_dict()``.

    The values are detached tensors sharing storage with the parameters (no copy), as
    ``state_dict()`` returns them.
    """
    return {name: param.detach() for name, param in adapter_named_parameters(model)}


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor],
                            strict: bool = True) -> nn.Module:
    """Copy ``state_dict`` (as :func:`adapter_state_dict` returns it) into the adapter tensors of
    ``model``, casting to each parameter's dtype and device. Returns ``model``.

    With ``strict`` a missing or an unexpected name is an error; a tensor whose shape differs
    from the parameter's always is. Everything is checked before anything is copied: on an error
    (a ``ValueError`` naming the tensors) ``model`` is unchanged. Merged LoRA layers are
    unmerged, loaded and merged again.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    expected = dict(adapter_named_parameters(model))
    hint = "" if expected else (" The model has no adapter parameters: inject the adapter first, "
                                "e.g. with apply_lora(model, ...).")
    pairs = _validate(expected, state_dict, strict, "state_dict", hint=hint)
    with _unmerged(model):
        _copy(pairs)
    return model


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the LoRA adapter of ``model`` to ``directory`` in HF PEFT's format and return the path.

    ``directory`` (created if needed) receives ``adapter_config.json`` and
    ``adapter_model.safetensors`` (tensors contiguous, on CPU, in their own dtype).
    ``base_model_name_or_path`` goes into the config; by default it is the transformers model's
    ``config._name_or_path`` (or null).
    """
    _, root = _transformers_root(model)
    entries = _file_entries(root)
    config = _peft_config(root, base_model_name_or_path)
    tensors = {_PREFIX + key: param.detach().to("cpu", copy=True).contiguous()
               for key, (_, param) in sorted(entries.items())}
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _peft_config(root: nn.Module, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` content that describes the LoRA layers of ``root``."""
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"{type(root).__name__} has no LoRA layers to save; inject them first with "
                         f"apply_lora(model, ...)")
    if any(not name for name, _ in layers):
        raise ValueError("the model itself is a LoRALinear; save the model that contains it")
    rslora = {m.use_rslora for _, m in layers}
    if len(rslora) > 1:
        mixed = [n for n, m in layers if m.use_rslora]
        raise ValueError(f"the LoRA layers mix use_rslora=True ({_first(mixed)}) and False, which "
                         f"adapter_config.json cannot express")
    r = _most_common(m.r for _, m in layers)
    alpha = _most_common(m.alpha for _, m in layers)
    saved = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    targets = [n for n, _ in layers]
    free = _names_outside_adapters(root)
    return {
        "peft_type": "LORA",
        "task_type": _task_type(root),
        "base_model_name_or_path": base_model_name_or_path or _name_or_path(root),
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": _most_common(m.dropout for _, m in layers),
        "target_modules": sorted(_short_names(targets, free, dotted=True)),
        "exclude_modules": None,
        "modules_to_save": sorted(_short_names(saved, free, dotted=False)) or None,
        "bias": _bias_mode(root, layers, saved),
        "use_rslora": rslora.pop(),
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "init_lora_weights": True if _most_common(m.init for _, m in layers) == "kaiming" else "gaussian",
        "rank_pattern": {n: m.r for n, m in layers if m.r != r},
        "alpha_pattern": {n: _json_number(m.alpha) for n, m in layers if m.alpha != alpha},
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
    }


def _short_names(chosen: list[str], names: list[str], dotted: bool) -> list[str]:
    """Leaf names for ``chosen`` where a leaf selects exactly the chosen modules, full names
    elsewhere. PEFT matches ``target_modules`` entries as dotted suffixes and ``modules_to_save``
    entries as plain string suffixes (``dotted=False``)."""
    chosen_set = set(chosen)
    out: set[str] = set()
    for name in chosen:
        leaf = name.rsplit(".", 1)[-1]
        hits = {n for n in names if n == leaf or (n.endswith("." + leaf) if dotted else n.endswith(leaf))}
        out.add(leaf if hits <= chosen_set else name)
    return list(out)


def _bias_mode(root: nn.Module, layers: list[tuple[str, LoRALinear]], saved: list[str]) -> str:
    """``"none"``, ``"all"`` or ``"lora_only"``: which biases of ``root`` were made trainable."""
    inside = [s + "." for s in saved]
    candidates, marked = set(), set()
    for name, module in root.named_modules():
        if isinstance(module, AdapterLayer) or any(name.startswith(p) for p in inside):
            continue
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            candidates.add(name)
            if getattr(module, TRAIN_BIAS_ATTR, False):
                marked.add(name)
    if not marked:
        return "none"
    if marked == candidates:
        return "all"
    if marked == {f"{n}.base_layer" for n, m in layers if m.base_layer.bias is not None}:
        return "lora_only"
    raise ValueError(f"the trainable biases ({_first(sorted(marked))}) are neither all biases nor those "
                     f"of the LoRA layers, which adapter_config.json's bias cannot express")


def _task_type(root: nn.Module) -> str | None:
    name = type(root).__name__
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


def _name_or_path(root: nn.Module) -> str | None:
    value = getattr(getattr(root, "config", None), "_name_or_path", None)
    return value if isinstance(value, str) and value else None


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values: Iterable[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_adapter(model: nn.Module, directory: str | Path, strict: bool = True) -> nn.Module:
    """Load the LoRA adapter in ``directory`` (written by :func:`save_adapter` or by HF PEFT's
    ``save_pretrained``) into ``model`` and return ``model``.

    When ``model`` has no adapter layers yet, the adapter the config describes is injected first
    (``target_modules``, ``rank_pattern``/``alpha_pattern``, ``use_rslora``, ``lora_dropout``,
    ``modules_to_save``, ``bias``), as :func:`~lightning_peft.lora.apply_lora` does. When it has,
    the tensors are loaded into the existing layers, whose ``alpha``/``use_rslora`` (hence
    scaling) are set from the config. Tensors are cast to each parameter's dtype and device.

    ``strict=False`` tolerates missing and unexpected tensors (never mis-shaped ones). Errors:
    ``FileNotFoundError`` for a missing directory or file, ``ValueError`` for a malformed or
    non-LoRA config, an unsupported PEFT option, and tensors that do not match the model. On any
    error the model is left exactly as it was.
    """
    config, tensors, where = _read_adapter(directory)
    _, root = _transformers_root(model)
    file_keys = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: k for k in tensors}
    if len(file_keys) != len(tensors):
        raise ValueError(f"{where}: tensor names collide once the {_PREFIX!r} prefix is removed")
    by_key = {key: tensors[full] for key, full in file_keys.items() if full.startswith(_PREFIX)}
    foreign = {full: tensors[full] for full in tensors if not full.startswith(_PREFIX)}

    inject = not has_adapters(root)
    if inject:
        groups, saved = _injection_plan(root, config, where)
        clone = _meta_structure(root)
        _inject(clone, config, groups, saved)
        expected = _file_entries(clone)
    else:
        expected = _file_entries(root)
        saved = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    by_key = _drop_peft_duplicates(by_key, saved, expected)
    _validate({_PREFIX + k: v[1] for k, v in expected.items()},
              {**{_PREFIX + k: v for k, v in by_key.items()}, **foreign}, strict, where)

    if inject:
        _inject(root, config, groups, saved)
        entries = _file_entries(root)
    else:
        entries = expected
    pairs = [(entries[k][1], t) for k, t in by_key.items() if k in entries]
    with _unmerged(root):
        if not inject:
            _set_scaling(root, config)
        _copy(pairs)
    return model


def _read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], str]:
    """Read and check ``adapter_config.json`` and ``adapter_model.safetensors`` of ``directory``."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist (or is not a directory)")
    config_path, weights_path = path / ADAPTER_CONFIG_NAME, path / ADAPTER_WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} not found: {str(path)!r} is not an adapter directory")
    if not weights_path.is_file():
        pickled = " (adapter_model.bin is a pickle and is not loaded)" \
            if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{str(weights_path)!r} not found{pickled}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object, got {type(config).__name__}")
    _check_config(config, str(config_path))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(weights_path)!r} is not a readable safetensors file: {err}") from err
    return config, tensors, str(weights_path)


def _check_config(config: dict[str, Any], where: str) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') "
                         f"can be loaded")
    used = [k for k in _UNSUPPORTED_OPTIONS if config.get(k)]
    if used:
        raise ValueError(f"{where}: PEFT options not supported here: "
                         + ", ".join(f"{k}={config[k]!r}" for k in used))
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(f"{where}: init_lora_weights={init!r} changes the base weights, so this adapter "
                         f"does not apply to the unchanged base model; save it with HF PEFT's "
                         f"path_initial_model_for_weight_conversion to get a plain LoRA")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{where}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"{where}: {key} must be a JSON object, got {config[key]!r}")
    target = config.get("target_modules")
    if target is not None and not isinstance(target, (str, list)):
        raise ValueError(f"{where}: target_modules must be a list or a string, got {target!r}")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) for s in saved)):
        raise ValueError(f"{where}: modules_to_save must be a list of names, got {saved!r}")


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``k`` (a regex) such that
    ``name`` matches ``(.*\\.)?(k)$``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _injection_plan(root: nn.Module, config: dict[str, Any],
                    where: str) -> tuple[dict[tuple[int, float], list[str]], list[str]]:
    """Group the target modules of ``root`` by (r, alpha) and resolve ``modules_to_save``.
    Reads the model only."""
    target = config.get("target_modules")
    if isinstance(target, list):
        target = sorted(set(target))
    try:
        targets = find_targets(root, target, config.get("exclude_modules"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    saved: list[str] = []
    for entry in dict.fromkeys(config.get("modules_to_save") or []):  # PEFT may list one twice
        try:  # PEFT skips entries that match nothing (e.g. the "score" it adds for SEQ_CLS)
            saved.extend(n for n in find_modules(root, [entry], "modules_to_save") if n not in saved)
        except ValueError:
            continue
    targets = [t for t in targets if t not in saved]  # PEFT never adapts a module it saves in full
    groups: dict[tuple[int, float], list[str]] = {}
    for name in targets:
        r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        groups.setdefault((r, alpha), []).append(name)
    return groups, saved


def _inject(root: nn.Module, config: dict[str, Any], groups: dict[tuple[int, float], list[str]],
            saved: list[str]) -> None:
    """Inject the planned adapter into ``root`` with :func:`apply_lora`, one call per (r, alpha)."""
    init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"
    for i, ((r, alpha), names) in enumerate(groups.items()):
        apply_lora(root, config=LoRAConfig(
            r=r, alpha=float(alpha), dropout=float(config.get("lora_dropout") or 0.0),
            target_modules="|".join(re.escape(n) for n in names),
            modules_to_save=list(saved) if i == 0 and saved else None,
            use_rslora=bool(config.get("use_rslora", False)), init=init,
            bias=config.get("bias") or "none"))


def _set_scaling(root: nn.Module, config: dict[str, Any]) -> None:
    """Give the existing LoRA layers the alpha and rsLoRA setting the config describes."""
    rslora = bool(config.get("use_rslora", False))
    for name, layer in root.named_modules():
        if isinstance(layer, LoRALinear):
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
            layer.alpha, layer.use_rslora = alpha, rslora
            layer.scaling = lora_scaling(layer.r, alpha, rslora)


def _meta_structure(root: nn.Module) -> nn.Module:
    """A deep copy of ``root`` whose parameters and buffers live on the meta device (no memory),
    to rehearse an injection on."""
    memo: dict[int, Any] = {}
    for tensor in [*root.parameters(), *root.buffers()]:
        if id(tensor) in memo:
            continue
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else meta
    try:
        return copy.deepcopy(root, memo)
    except Exception as err:
        raise TypeError(f"could not copy the structure of {type(root).__name__} to check the adapter "
                        f"before injecting it ({err}); inject it first with apply_lora(model, ...) "
                        f"and load again") from err


def _drop_peft_duplicates(by_key: dict[str, Tensor], saved: list[str],
                          expected: Mapping[str, Any]) -> dict[str, Tensor]:
    """HF PEFT with ``bias="all"`` also writes ``<saved>.original_module.bias`` and
    ``<saved>.modules_to_save.bias`` beside ``<saved>.bias`` for a module trained in full:
    drop those copies."""
    copies = tuple(f"{s}.{kind}." for s in saved for kind in ("original_module", "modules_to_save"))
    return {k: t for k, t in by_key.items() if k in expected or not k.startswith(copies)}


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _transformers_root(model: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, module)``: the outermost transformers ``PreTrainedModel`` inside ``model`` that
    holds every adapter layer (the only one, when there are no adapter layers yet), else
    ``("", model)``."""
    transformers = sys.modules.get("transformers")  # no transformers model exists unless imported
    if transformers is None:
        return "", model
    pretrained = transformers.PreTrainedModel
    if isinstance(model, pretrained):
        return "", model
    outer: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, pretrained) and not any(name.startswith(o + ".") for o, _ in outer):
            outer.append((name, module))
    adapters = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if adapters:
        outer = [(o, m) for o, m in outer if all(a.startswith(o + ".") for a in adapters)]
    return outer[0] if len(outer) == 1 else ("", model)


def _file_entries(root: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """``{file key without "base_model.model.": (name in root, parameter)}`` for the adapter of
    ``root``, in HF PEFT's naming."""
    entries: dict[str, tuple[str, nn.Parameter]] = {}
    saved: list[str] = []
    for name, module in root.named_modules():
        dot = f"{name}." if name else ""
        if isinstance(module, LoRALinear):
            for attr in ("lora_A", "lora_B"):
                entries[f"{dot}{attr}.weight"] = (f"{dot}{attr}", getattr(module, attr))
        elif isinstance(module, ModulesToSave):
            saved.append(dot)
            for pname, param in module.modules_to_save.named_parameters():
                entries[dot + pname] = (f"{dot}modules_to_save.{pname}", param)
        elif isinstance(module, AdapterLayer):
            raise ValueError(f"{name or type(root).__name__} is a {type(module).__name__}; the HF PEFT "
                             f"LoRA format holds only LoRA layers and modules_to_save")
    covered = {id(param) for _, param in entries.values()}
    for name, param in adapter_named_parameters(root):
        if id(param) in covered or any(name.startswith(s + "original_module.") for s in saved):
            continue  # the frozen original of a module trained in full is not part of the adapter
        entries[name] = (name, param)
    return entries


def _names_outside_adapters(root: nn.Module) -> list[str]:
    """Names of the modules of ``root`` that are not inside an adapter layer."""
    adapters = [n + "." for n, m in root.named_modules() if isinstance(m, AdapterLayer) and n]
    return [n for n, _ in root.named_modules() if n and not any(n.startswith(a) for a in adapters)]


def _validate(expected: Mapping[str, nn.Parameter | Tensor], given: Mapping[str, Any], strict: bool,
              where: str, hint: str = "") -> list[tuple[Tensor, Tensor]]:
    """Check ``given`` against the ``expected`` tensors by name and shape; return the
    ``(destination, source)`` pairs to copy, or raise a ``ValueError`` naming every mismatch."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong: list[str] = []
    for name in sorted(set(expected) & set(given)):
        dest, src = expected[name], given[name]
        if not isinstance(src, Tensor):
            wrong.append(f"{name}: a {type(src).__name__}, not a tensor")
        elif tuple(src.shape) != tuple(dest.shape):
            wrong.append(f"{name}: shape {tuple(src.shape)} in {where} vs {tuple(dest.shape)} in the model")
        elif dest.is_floating_point() and not src.is_floating_point():
            wrong.append(f"{name}: dtype {src.dtype} in {where}, the model's is {dest.dtype}")
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing ({_first(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped ({_first(wrong)})")
    if problems:
        raise ValueError(f"{where} does not match the model's adapter: " + "; ".join(problems)
                         + ". Nothing was loaded; the model is unchanged." + hint)
    return [(expected[n], given[n]) for n in sorted(set(expected) & set(given))]


def _first(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


@contextmanager
def _unmerged(model: nn.Module) -> Iterator[None]:
    """Unmerge the merged LoRA layers of ``model`` for the block, then merge them again."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.merged]
    for layer in layers:
        layer.unmerge()
    try:
        yield
    finally:
        for layer in layers:
            layer.merge()


@torch.no_grad()
def _copy(pairs: list[tuple[Tensor, Tensor]]) -> None:
    for dest, src in pairs:
        dest.copy_(src.to(device=dest.device, dtype=dest.dtype))


__all__ = ["adapter_state_dict", "load_adapter", "load_adapter_state_dict", "save_adapter"]
