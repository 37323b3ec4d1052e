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

Saving is atomic: both files are written into a hidden sibling directory, which then takes the
adapter directory's place in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere each file
is replaced in one step), so a process killed mid-save leaves either the old pair or the new one.
Other files in the directory (a README, plots) are kept. The weights' safetensors metadata also
records the config fields that decide how they are read (``lightning_peft.adapter_config``);
loading refuses a config file that disagrees with it (files of two saves, or an edit), naming the
field. Files HF PEFT wrote have no such record and load as before.

Loading is all or nothing: every config field (types, ranges, pattern syntax) and every tensor
(name, shape, dtype, finiteness after the cast to the model's dtype) is checked against the model
(against a copy of its structure on the meta device when the adapter still has to be injected)
before anything is changed; on a problem a ``ValueError`` names the fields or tensors and the
model is left exactly as it was, LoRA settings (alpha, rsLoRA) included.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
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
    adapter_named_buffers,
    adapter_named_parameters,
    has_adapters,
    inside_any,
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
    "use_bdlora", "megatron_config", "arrow_config", "kasa_config", "monteclora_config",
)
# Config fields that hold true or false (a string "false" would read as true).
_BOOL_FIELDS = ("inference_mode", "use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "use_qalora",
                "ensure_weight_tying")
_BIAS_MODES = ("none", "all", "lora_only")
# ``init_lora_weights`` values whose adapter is a plain LoRA on the unchanged base model (PiSSA,
# OLoRA, CorDA, LoftQ, ... rewrite the base weights, so their raw adapters do not apply to it).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# The fields that decide how the weights are read; save_adapter records them in the weights'
# metadata under _BOUND_KEY and load_adapter refuses a config file that disagrees.
_BOUND_FIELDS = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
                 "target_modules", "exclude_modules", "modules_to_save", "bias")
_BOUND_KEY = "lightning_peft.adapter_config"
_STAGING = ".lightning-peft-staging-"


# --------------------------------------------------------------------------------------------
# Adapter state dicts (names as in the model; what the Lightning callback checkpoints)
# --------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor of ``model`` (LoRA ``A``/``B``, modules trained in full with their
    persistent buffers such as BatchNorm statistics, trainable biases), keyed by its name in
    ``model.state_dict()``.

    The values are detached tensors sharing storage with the parameters (no copy), as
    ``state_dict()`` returns them.
    """
    return {name: tensor.detach() for name, tensor in _adapter_tensors(model).items()}


def _adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Adapter parameters and persistent adapter buffers of ``model`` by their state-dict name."""
    tensors: dict[str, Tensor] = dict(adapter_named_parameters(model))
    tensors.update((n, b) for n, b in adapter_named_buffers(model) if _persistent(model, n))
    return tensors


def _persistent(model: nn.Module, name: str) -> bool:
    """Whether buffer ``name`` of ``model`` is part of ``state_dict()``."""
    owner, _, leaf = name.rpartition(".")
    return leaf not in model.get_submodule(owner)._non_persistent_buffers_set


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor],
                            strict: bool = True) -> nn.Module:
    """Copy ``state_dict`` (as :func:`adapter_state_dict` returns it) into the adapter tensors of
    ``model``, casting to each parameter's dtype and device. Returns ``model``.

    With ``strict`` a missing or an unexpected name is an error; a tensor whose shape differs
    from the parameter's, a float tensor for an integer buffer (or the reverse), and NaN/inf
    (also once cast to the parameter's dtype) always are. Everything is checked before anything
    is copied: on an error (a ``ValueError`` naming the tensors) ``model`` is unchanged. Merged
    LoRA layers are unmerged, loaded and merged again.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    expected = _adapter_tensors(model)
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
    ``adapter_model.safetensors`` (tensors contiguous, on CPU, in their own dtype; the persistent
    buffers of modules trained in full, such as BatchNorm statistics, included, as HF PEFT saves
    them). ``base_model_name_or_path`` goes into the config; by default it is the transformers
    model's ``config._name_or_path`` (or null).

    An existing adapter is replaced atomically: a process killed at any moment leaves the old
    pair or the new one, never a mix. Other files in ``directory`` are kept; the two files get
    the mode the umask gives (0644 under umask 022). Concurrent saves to one directory are not
    supported.
    """
    _, root = _transformers_root(model)
    entries = _file_entries(root)
    config = _peft_config(root, base_model_name_or_path)
    tensors = {_PREFIX + key: param.detach().to("cpu", copy=True).contiguous()
               for key, (_, param) in sorted(entries.items())}
    bound = json.dumps({k: config.get(k) for k in _BOUND_FIELDS}, sort_keys=True)
    path = Path(directory)
    _write_directory(path, json.dumps(config, indent=2, sort_keys=True) + "\n", tensors,
                     {"format": "pt", _BOUND_KEY: bound})
    return path


def _write_directory(path: Path, config_text: str, tensors: dict[str, Tensor],
                     metadata: dict[str, str]) -> None:
    """Write the adapter files into a hidden sibling of ``path`` and put them in place atomically.

    A new directory is renamed into place. An existing one is exchanged with the sibling in one
    step (after hard links to its other files were made in the sibling), and the old files are
    then removed. Where that is not possible (not Linux, a file system without RENAME_EXCHANGE,
    the working directory inside ``path``, a parent directory that is not writable: then the
    files are staged inside ``path``) each file is replaced in one step, weights first. What a
    killed save left behind is removed by the next save.
    """
    from safetensors.torch import save_file

    target = Path(os.path.realpath(path))  # a symlink to the adapter directory stays a symlink
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save an adapter to {str(path)!r}: it exists and is not a "
                                 f"directory")
    existed = target.is_dir()
    if not existed:
        target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target.parent, f".{target.name}{_STAGING}")
    if existed:
        _remove_stale_staging(target, _STAGING)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = target.parent / f".{target.name}{_STAGING}{token}"
    try:
        os.mkdir(staging)  # the umask's mode
    except PermissionError:
        if not existed:
            raise
        staging = target / f"{_STAGING}{token}"  # the parent is read-only: stage inside
        os.mkdir(staging)
    try:
        cwd = os.path.realpath(os.getcwd())  # an exchange would leave it in the removed directory
        exchange = existed and staging.parent == target.parent and cwd != str(target) \
            and not cwd.startswith(str(target) + os.sep)
        if existed:
            shutil.copymode(target, staging)
        if exchange:
            _link_other_files(target, staging)
        config_file, weights_file = staging / ADAPTER_CONFIG_NAME, staging / ADAPTER_WEIGHTS_NAME
        with open(config_file, "w", encoding="utf-8") as file:
            file.write(config_text)
            file.flush()
            os.fsync(file.fileno())
        save_file(tensors, str(weights_file), metadata=metadata)
        os.chmod(weights_file, config_file.stat().st_mode & 0o777)  # safetensors creates it 0600
        _fsync(weights_file)
        _fsync(staging)
        if not existed:
            os.rename(staging, target)
        elif not (exchange and _exchange_directories(staging, target)):
            for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
                os.replace(staging / name, target / name)
            _fsync(target)
        _fsync(target.parent)
    finally:  # after an exchange the staging directory holds the old files
        shutil.rmtree(staging, ignore_errors=True)


def _link_other_files(source: Path, destination: Path) -> None:
    """Give ``destination`` the entries of ``source`` other than the adapter files: hard links to
    its files (copies where linking fails), copies of its folders and symlinks."""
    for entry in os.scandir(source):
        if entry.name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) or entry.name.startswith(_STAGING):
            continue
        dest = destination / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dest)
        elif entry.is_dir():
            shutil.copytree(entry.path, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dest)


def _link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange_directories(first: Path, second: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); return
    False where the platform or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(second))


def _remove_stale_staging(folder: Path, prefix: str) -> None:
    """Remove the entries of ``folder`` named ``<prefix><pid>-...`` that saves killed before
    finishing left (their process is gone)."""
    if os.name != "posix":  # os.kill(pid, 0) only probes on POSIX
        return
    for entry in os.scandir(folder):
        pid = entry.name[len(prefix):].split("-", 1)[0] if entry.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a file or a directory (its entries) to disk; a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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

    ``strict=False`` tolerates missing and unexpected tensors (never mis-shaped, wrongly typed or
    non-finite ones). Errors: ``FileNotFoundError`` for a missing directory or file,
    ``ValueError`` for a malformed or non-LoRA config (every field is checked: JSON types,
    positive finite ``r``/``lora_alpha``/pattern values, valid pattern keys), an unsupported PEFT
    option, a config that disagrees with the one recorded in the weights, and tensors that do not
    match the model or hold NaN/inf. On any error the model is left exactly as it was.
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
        scalings = _planned_scalings(root, config)
    by_key = _drop_peft_duplicates(by_key, saved, expected)
    checked = dict(_validate({_PREFIX + k: v[1] for k, v in expected.items()},
                             {**{_PREFIX + k: v for k, v in by_key.items()}, **foreign}, strict, where,
                             keys=True))

    if inject:
        _inject(root, config, groups, saved)
        entries = _file_entries(root)
    else:
        entries = expected
    pairs = [(entries[k][1], checked[_PREFIX + k]) for k in by_key if k in entries]
    with _unmerged(root):
        if not inject:
            for layer, (alpha, rslora, scaling) in scalings.items():
                layer.alpha, layer.use_rslora, layer.scaling = alpha, rslora, scaling
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
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(weights_path)!r} is not a readable safetensors file: {err}") from err
    _check_binding(config, metadata.get(_BOUND_KEY), str(config_path), str(weights_path))
    return config, tensors, str(weights_path)


def _check_binding(config: dict[str, Any], bound: str | None, config_path: str, weights_path: str) -> None:
    """Refuse a config that disagrees with the fields :func:`save_adapter` recorded in the
    weights' metadata (absent from files HF PEFT wrote: nothing to check)."""
    if bound is None:
        return
    try:
        recorded = json.loads(bound)
    except json.JSONDecodeError as err:
        raise ValueError(f"{weights_path}: metadata {_BOUND_KEY!r} is not valid JSON: {err}") from err
    if not isinstance(recorded, dict):
        raise ValueError(f"{weights_path}: metadata {_BOUND_KEY!r} must hold a JSON object")
    differ = [f"{k} is {config.get(k)!r} in {config_path} but {recorded.get(k)!r} in the weights' "
              f"metadata" for k in _BOUND_FIELDS if k in recorded and config.get(k) != recorded[k]]
    if differ:
        raise ValueError(f"{weights_path}: the config does not belong to these weights: {'; '.join(differ)} "
                         f"({_BOUND_KEY!r} records the config they were saved with). The two files come "
                         f"from different saves, or the config was edited after saving. Nothing was "
                         f"loaded; the model is unchanged.")


def _check_config(config: dict[str, Any], where: str) -> None:
    """Check every field this loader reads (JSON type, range, pattern syntax), naming the field:
    a ``ValueError`` before anything is built."""
    def fail(key: str, expected: str) -> None:
        raise ValueError(f"{where}: {key} must be {expected}, got {config[key]!r}")

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') "
                         f"can be loaded")
    for key in ("task_type", "base_model_name_or_path", "revision"):
        if config.get(key) is not None and not isinstance(config[key], str):
            fail(key, "a string or null")
    for key in _BOOL_FIELDS:
        if key in config and not isinstance(config[key], bool):
            fail(key, "true or false (a JSON boolean)")
    used = [k for k in _UNSUPPORTED_OPTIONS if config.get(k)]
    if used:
        raise ValueError(f"{where}: PEFT options not supported here: "
                         + ", ".join(f"{k}={config[k]!r}" for k in used))
    init = config.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        fail("init_lora_weights", f"one of {list(_PLAIN_INITS)}")
    if init not in _PLAIN_INITS:
        raise ValueError(f"{where}: init_lora_weights={init!r} changes the base weights, so this adapter "
                         f"does not apply to the unchanged base model; save it with HF PEFT's "
                         f"path_initial_model_for_weight_conversion to get a plain LoRA")
    if not _is_rank(config.get("r")):
        raise ValueError(f"{where}: r must be a positive integer, got {config.get('r')!r}")
    if not _is_alpha(config.get("lora_alpha")):
        raise ValueError(f"{where}: lora_alpha must be a positive finite number, got "
                         f"{config.get('lora_alpha')!r}")
    for key, valid, expected in (("rank_pattern", _is_rank, "a positive integer"),
                                 ("alpha_pattern", _is_alpha, "a positive finite number")):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            fail(key, "a JSON object of {pattern: value}")
        for pattern, value in patterns.items():
            if not pattern:
                raise ValueError(f"{where}: {key} has an empty pattern; keys are module names or "
                                 f"regular expressions such as 'model.layers.0.self_attn.q_proj'")
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as err:
                raise ValueError(f"{where}: {key} key {pattern!r} is not a valid regular expression: "
                                 f"{err}") from err
            if not valid(value):
                raise ValueError(f"{where}: {key}[{pattern!r}] must be {expected}, got {value!r}")
    dropout = config.get("lora_dropout")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0.0 <= dropout < 1.0):
        fail("lora_dropout", "a number in [0, 1)")
    if config.get("bias") is not None and config["bias"] not in _BIAS_MODES:
        fail("bias", f"one of {list(_BIAS_MODES)}")
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{where}: {key}={value!r} is not a valid regular expression: "
                                 f"{err}") from err
        elif not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
            fail(key, "a list of module names, a regular expression string or null")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) and s for s in saved)):
        fail("modules_to_save", "a list of module names or null")


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


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
    # PEFT adapts nothing it trains in full, nor anything inside it (RoBERTa's two-Linear
    # classifier under "all-linear": PEFT lists its Linears in target_modules all the same)
    kept = [t for t in targets if not inside_any(t, saved)]
    if not kept:
        raise ValueError(f"{where}: every module target_modules selects ({_first(targets)}) is or lies "
                         f"inside a module of modules_to_save ({_first(saved)}); nothing is left to adapt")
    groups: dict[tuple[int, float], list[str]] = {}
    for name in kept:
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


def _planned_scalings(root: nn.Module, config: dict[str, Any]) -> dict[LoRALinear, tuple[float, bool, float]]:
    """``{layer: (alpha, use_rslora, scaling)}``: what the config (already checked) gives the
    existing LoRA layers of ``root``. Changes nothing, so that a later error leaves them as they
    are."""
    rslora = config.get("use_rslora", False)
    plan = {}
    for name, layer in root.named_modules():
        if isinstance(layer, LoRALinear):
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
            plan[layer] = (alpha, rslora, lora_scaling(layer.r, alpha, rslora))
    return plan


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


def _file_entries(root: nn.Module) -> dict[str, tuple[str, Tensor]]:
    """``{file key without "base_model.model.": (name in root, tensor)}`` for the adapter of
    ``root``, in HF PEFT's naming: LoRA ``A``/``B``, the parameters and persistent buffers of
    modules trained in full (``<path>.running_mean``), trainable biases."""
    entries: dict[str, tuple[str, Tensor]] = {}
    saved: list[str] = []
    for name, module in root.named_modules():
        dot = f"{name}." if name else ""
        if isinstance(module, LoRALinear):
            for attr in ("lora_A", "lora_B"):
                entries[f"{dot}{attr}.weight"] = (f"{dot}{attr}", getattr(module, attr))
        elif isinstance(module, ModulesToSave):
            saved.append(dot)
            trained = module.modules_to_save
            for pname, param in trained.named_parameters():
                entries[dot + pname] = (f"{dot}modules_to_save.{pname}", param)
            for bname, buf in trained.named_buffers():
                if _persistent(trained, bname):
                    entries[dot + bname] = (f"{dot}modules_to_save.{bname}", buf)
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


def _validate(expected: Mapping[str, Tensor], given: Mapping[str, Any], strict: bool, where: str,
              hint: str = "", keys: bool = False) -> list[tuple[Any, Tensor]]:
    """Check ``given`` against the ``expected`` tensors by name, shape, kind of dtype (float or
    integer) and finiteness once cast to the destination's dtype. Return the ``(destination,
    source cast to its dtype)`` pairs to copy (``(name, cast source)`` with ``keys``), or raise a
    ``ValueError`` naming every problem."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong: list[str] = []
    nonfinite: list[str] = []
    cast: dict[str, Tensor] = {}
    for name in sorted(set(expected) & set(given)):
        dest, src = expected[name], given[name]
        if not isinstance(src, Tensor):
            wrong.append(f"{name}: a {type(src).__name__}, not a tensor")
        elif tuple(src.shape) != tuple(dest.shape):
            wrong.append(f"{name}: shape {tuple(src.shape)} in {where} vs {tuple(dest.shape)} in the model")
        elif dest.is_floating_point() != src.is_floating_point() or src.is_complex():
            wrong.append(f"{name}: dtype {src.dtype} in {where}, the model's is {dest.dtype}")
        else:
            cast[name] = src.detach().to(dtype=dest.dtype)
            if dest.is_floating_point():
                bad = int((~torch.isfinite(cast[name])).sum())
                if bad:
                    after = f" once cast to {dest.dtype}" if bool(torch.isfinite(src).all()) else ""
                    nonfinite.append(f"{name}: {bad} NaN/inf{after}")
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing ({_first(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped ({_first(wrong)})")
    if nonfinite:
        problems.append(f"{len(nonfinite)} non-finite ({_first(nonfinite)})")
    if problems:
        raise ValueError(f"{where} does not match the model's adapter: " + "; ".join(problems)
                         + ". Nothing was loaded; the model is unchanged." + hint)
    return [(name if keys else expected[name], src) for name, src in cast.items()]


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
