"""Adapter state dicts and adapter files for every registered method (safetensors + JSON, never
pickle). Nothing here knows a method by name: the registry (:mod:`lightning_peft.methods`) says
which method a model or a file carries, how its ``adapter_config.json`` is written and read, and
each adapter layer names its tensors (``AdapterLayer.file_key``).

A directory written by :func:`save_adapter` holds two files, in HF PEFT's layout (so a method PEFT
has loads in ``PeftModel.from_pretrained``, and :func:`load_adapter` loads directories PEFT wrote):

- ``adapter_config.json``: ``peft_type`` (``"LORA"``, ``"IA3"``, ``"ADALORA"``, or our own name for
  a method PEFT does not have), ``task_type``, ``base_model_name_or_path`` and the method's own
  fields, rebuilt from the model itself by the method's ``to_json``.
- ``adapter_model.safetensors``: for an adapter layer at ``<path>`` of the transformers model, each
  of its tensors as ``base_model.model.<path>.<file_key>`` (LoRA ``lora_A.weight``, IA3
  ``ia3_l``); a module trained in full (``modules_to_save``) as ``base_model.model.<path>.<param>``
  (persistent buffers included); trainable biases as ``base_model.model.<path>.bias``.

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
(name, shape, dtype, finiteness after the cast to the model's dtype, and the method's own
``check_tensors``, e.g. FishMask's indices in range and increasing) is checked against the model
(against a copy of its structure on the meta device when the adapter still has to be injected)
before anything is changed; on a problem a ``ValueError`` names the fields or tensors and the
model is left exactly as it was, LoRA settings (alpha, rsLoRA) included.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._base import (
    AdapterLayer,
    ModulesToSave,
    adapter_named_buffers,
    adapter_named_parameters,
    first_names,
)
from lightning_peft.methods import file_method, get_method, method_for_peft_type, methods_in
from lightning_peft.targeting import embedding_names, targets_from_file

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

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
    """Adapter parameters and persistent adapter buffers of ``model`` by their name in
    ``model.state_dict()`` (a Fabric-wrapped module's state dict is its inner module's, without
    the wrapper's ``_forward_module.`` prefix that its parameter names carry)."""
    model = _state_dict_owner(model)
    tensors: dict[str, Tensor] = dict(adapter_named_parameters(model))
    tensors.update((n, b) for n, b in adapter_named_buffers(model) if _persistent(model, n))
    return tensors


@contextlib.contextmanager
def _config_values(where: str):
    """A config value of a kind or size a method's checks did not foresee (a list where a name
    goes, a 400-digit integer) comes out as the ``ValueError`` of a malformed config, naming the
    file, rather than the ``TypeError``/``OverflowError`` of whatever used it first. Used only
    while nothing of the model has changed."""
    try:
        yield
    except (TypeError, OverflowError) as err:
        raise ValueError(f"{where}: a field has a value of the wrong kind or size ({err}); nothing was "
                         f"loaded, the model is unchanged") from err


def check_method_tensors(model: nn.Module, state_dict: Mapping[str, Any], where: str) -> None:
    """The checks of the methods ``model`` carries on tensors keyed by their names in
    ``model.state_dict()`` (e.g. a sparse update's indices in range and increasing), as files get
    them (:attr:`Method.check_tensors`): a ``ValueError`` naming ``where`` before anything is
    copied."""
    prefix, root = _transformers_root(_state_dict_owner(model))
    checking = [m for m in methods_in(root) if m.check_tensors is not None]
    if not checking:
        return
    dot = f"{prefix}." if prefix else ""
    by_file_key = {key: state_dict[dot + name] for key, (name, _) in _file_entries(root).items()
                   if dot + name in state_dict}
    for method in checking:
        method.check_tensors(root, by_file_key, where)


def _state_dict_owner(model: nn.Module) -> nn.Module:
    """The module whose ``state_dict()`` ``model.state_dict()`` returns: Fabric's wrapper delegates
    to the module it wraps."""
    for package in ("lightning.fabric", "lightning_fabric"):  # a wrapper exists only once imported
        wrappers = sys.modules.get(f"{package}.wrappers")
        if wrappers is not None and isinstance(model, wrappers._FabricModule):
            return model.module
    return model


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
    model = _state_dict_owner(model)
    expected = _adapter_tensors(model)
    hint = "" if expected else (" The model has no adapter parameters: inject the adapter first, "
                                "e.g. with apply_lora(model, ...).")
    pairs = _validate(expected, state_dict, strict, "state_dict", hint=hint)
    check_method_tensors(model, state_dict, "state_dict")
    with _unmerged(model):
        _copy(pairs)
    return model


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path,
                 base_model_name_or_path: str | None = None, adapter_name: str | None = None) -> Path:
    """Write the adapter of ``model`` (any registered method) to ``directory`` and return the
    path: HF PEFT's format for the methods PEFT has, the same layout with our own ``peft_type``
    for the others.

    ``directory`` (created if needed) receives ``adapter_config.json`` and
    ``adapter_model.safetensors`` (tensors contiguous, on CPU, in their own dtype; the persistent
    buffers of modules trained in full, such as BatchNorm statistics, included, as HF PEFT saves
    them). ``base_model_name_or_path`` goes into the config; by default it is the transformers
    model's ``config._name_or_path`` (or null).

    An existing adapter is replaced atomically: a process killed at any moment leaves the old
    pair or the new one, never a mix (where the directory cannot be swapped in one step, each file
    is replaced in one step, and a kill between the two leaves a pair ``load_adapter`` refuses).
    Other files in ``directory`` are kept; the two files get
    the mode the umask gives (0644 under umask 022). Concurrent saves to one directory are not
    supported.

    Under FSDP (FSDP1's ``FullyShardedDataParallel``, FSDP2's ``fully_shard``) every rank calls
    it with the same arguments: the sharded adapter tensors are gathered to their full values
    (:func:`lightning_peft.fsdp.full_adapter_tensors`, wrapper prefixes such as
    ``_fsdp_wrapped_module.`` dropped from the keys) and rank 0 alone writes the files.

    Named adapters (LoRA's :func:`lightning_peft.add_adapter`) are saved as HF PEFT's
    ``save_pretrained`` saves a model with several adapters: the default adapter in ``directory``,
    each other one alone (PEFT's plain keys, ``lora_A.weight``) in ``directory/<name>``.
    ``adapter_name=None`` writes them all; ``adapter_name="<name>"`` that one only (in
    ``directory/<name>``; ``"default"``: in ``directory``). Returns ``directory`` (or
    ``directory/<name>``).
    """
    _, root = _transformers_root(model)
    method = file_method(root)
    if isinstance(root, AdapterLayer):
        raise ValueError(f"the model itself is a {type(root).__name__}; save the model that contains it")
    named = _named_adapters(root)
    if adapter_name is not None and adapter_name != "default" and adapter_name not in named:
        raise ValueError(f"adapter_name={adapter_name!r}: the model has no such adapter; its adapters are "
                         f"{['default', *named]}")
    path = Path(directory)
    if adapter_name is not None and adapter_name != "default":
        return _save_one(root, method, path / adapter_name, base_model_name_or_path, adapter_name, model)
    _save_one(root, method, path, base_model_name_or_path, None, model)
    if adapter_name is None:
        for name in named:
            _save_one(root, method, path / name, base_model_name_or_path, name, model)
    return path


def _save_one(root: nn.Module, method: Any, path: Path, base_model_name_or_path: str | None,
              adapter_name: str | None, outer: nn.Module | None = None) -> Path:
    """Write the adapter of ``root`` (the named adapter ``adapter_name`` alone if given) to ``path``."""
    from lightning_peft.fsdp import clean_name, full_adapter_tensors, is_sharded, rank

    named = {"adapter_name": adapter_name} if adapter_name is not None else {}
    outer = root if outer is None else outer
    writes = not is_sharded(outer) or rank() == 0  # sharded: every rank gathers, rank 0 writes
    with full_adapter_tensors(outer) as full:
        entries = _file_entries(root) if adapter_name is None else _named_entries(root, adapter_name)
        tensors = {method.file_prefix + clean_name(key):
                   full(param).detach().to("cpu", copy=True).contiguous()
                   for key, (_, param) in sorted(entries.items())}
        fields = method.to_json(root, **named) if writes else {}
    if not writes:
        return path
    config = {"peft_type": method.peft_type, "task_type": _task_type(root),
              "base_model_name_or_path": base_model_name_or_path or _name_or_path(root),
              "revision": None, "inference_mode": True, **fields}
    bound_fields = method.bound_fields if method.bound_fields is not None else ("peft_type", *fields)
    bound = json.dumps({k: config.get(k) for k in bound_fields}, sort_keys=True)
    _write_directory(path, json.dumps(config, indent=2, sort_keys=True) + "\n", tensors,
                     {"format": "pt", _BOUND_KEY: bound})
    return path


def _named_adapters(root: nn.Module) -> list[str]:
    """The named adapters the adapter layers of ``root`` hold besides their default one."""
    names: dict[str, None] = {}
    for module in root.modules():
        if isinstance(module, AdapterLayer):
            names.update(dict.fromkeys(module.named_adapters()))
    return list(names)


def _named_entries(root: nn.Module, adapter_name: str) -> dict[str, tuple[str, Tensor]]:
    """:func:`_file_entries` of the named adapter ``adapter_name`` alone, under PEFT's plain keys."""
    entries: dict[str, tuple[str, Tensor]] = {}
    for name, module in root.named_modules():
        if isinstance(module, AdapterLayer):
            dot = f"{name}." if name else ""
            for key, (attr, tensor) in module.named_adapter_files(adapter_name).items():
                entries[dot + key] = (dot + attr, tensor)
    return entries


def _write_directory(path: Path, config_text: str, tensors: dict[str, Tensor],
                     metadata: dict[str, str]) -> None:
    """Write the adapter files into a hidden sibling of ``path`` and put them in place atomically.

    A new directory is renamed into place. An existing one is exchanged with the sibling in one
    step (after hard links to its other files were made in the sibling), and the old files are
    then removed. Where that is not possible (not Linux, a file system without RENAME_EXCHANGE,
    the working directory inside ``path``; a parent directory that cannot be written, or a mount
    at or below ``path``: then the files are staged inside ``path``) each file is replaced in one
    step, weights first: a process killed between the two leaves a pair that ``load_adapter``
    refuses (the weights record their config). What a killed save left behind is removed by the
    next save.
    """
    from safetensors.torch import save_file

    target = Path(os.path.realpath(path))  # a symlink to the adapter directory stays a symlink
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save an adapter to {str(path)!r}: it exists and is not a "
                                 f"directory")
    existed = target.is_dir()
    if not existed:
        target.parent.mkdir(parents=True, exist_ok=True)
    if existed:
        _remove_stale_staging(target, _STAGING)
    # a mount at or inside the directory: the exchange cannot move it (EBUSY), or would carry it
    # off with the old directory, whose removal then empties it: stage inside, file by file
    staging = None
    if not (existed and _holds_a_mount(target)):
        try:
            staging = staging_sibling(target)
        except OSError as err:
            if not existed or err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
    if staging is None:  # a mount, or a parent that cannot be written: stage inside
        staging = _new_staging(target / f"{_STAGING}{os.getpid()}-{secrets.token_hex(4)}")
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
        _IN_USE.discard(str(staging))


def _holds_a_mount(directory: Path) -> bool:
    """Whether ``directory`` is a mount point or has one anywhere below it (symlinks not
    followed)."""
    device = os.stat(directory).st_dev
    if os.stat(directory.parent).st_dev != device:
        return True
    for root, dirs, _ in os.walk(directory):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path) and os.stat(path).st_dev != device:
                return True
    return False


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


def staging_sibling(target: Path) -> Path:
    """A new hidden directory beside ``target`` (``.<name>.lightning-peft-staging-<pid>-<hex>``,
    the umask's mode), to write into before it is renamed into place: never an existing path.
    Siblings that killed writes left (their process gone) are removed first."""
    _remove_stale_staging(target.parent, f".{target.name}{_STAGING}")
    return _new_staging(target.parent / f".{target.name}{_STAGING}{os.getpid()}-{secrets.token_hex(4)}")


_IN_USE: set[str] = set()
"""The staging directories this process is writing (a leftover with this process's PID is an
earlier process's: a restarted container's main process gets the same PID)."""


def _new_staging(path: Path) -> Path:
    os.mkdir(path)  # the umask's mode
    _IN_USE.add(str(path))
    return path


def _remove_stale_staging(folder: Path, prefix: str) -> None:
    """Remove the entries of ``folder`` named ``<prefix><pid>-...`` that saves killed before
    finishing left (their process is gone, or it is this PID but not this process's)."""
    if os.name != "posix":  # os.kill(pid, 0) only probes on POSIX
        return
    for entry in os.scandir(folder):
        pid = entry.name[len(prefix):].split("-", 1)[0] if entry.name.startswith(prefix) else ""
        if not pid.isdigit() or entry.path in _IN_USE:
            continue
        if int(pid) == os.getpid() or not _alive(int(pid)):
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


def _task_type(root: nn.Module) -> str | None:
    name = type(root).__name__
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


def _name_or_path(root: nn.Module) -> str | None:
    value = getattr(getattr(root, "config", None), "_name_or_path", None)
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_adapter(model: nn.Module, directory: str | Path, strict: bool = True,
                 adapter_name: str | None = None) -> nn.Module:
    """Load the adapter in ``directory`` (written by :func:`save_adapter` or by HF PEFT's
    ``save_pretrained``) into ``model`` and return ``model``. The method is the one the registry
    holds for the file's ``peft_type``.

    When ``model`` carries no adapter yet, the adapter the config describes is injected first (the
    method's ``from_json``, checked on a meta-device copy of the model). When it carries the same
    method's adapter, the tensors are loaded into the existing layers and the method's non-tensor
    settings (LoRA's alpha and rsLoRA) are set from the config; another method's adapter is an
    error. Tensors are cast to each parameter's dtype and device.

    ``strict=False`` tolerates missing and unexpected tensors (never mis-shaped, wrongly typed or
    non-finite ones). Errors: ``FileNotFoundError`` for a missing directory or file,
    ``ValueError`` for an unknown ``peft_type``, a malformed config (every field is checked by the
    method, naming the field), an unsupported PEFT option, a config that disagrees with the one
    recorded in the weights, and tensors that do not match the model or hold NaN/inf. On any
    error the model is left exactly as it was.

    ``adapter_name`` (LoRA): load the file as that named adapter (see
    :func:`lightning_peft.add_adapter`), beside the default one the model already carries, or
    into the existing adapter of that name; it is not made active. ``directory`` is the adapter's
    own directory or the one HF PEFT's ``save_pretrained`` (or :func:`save_adapter`) wrote for
    several adapters: then ``directory/<adapter_name>`` is read. ``None`` or ``"default"``: the
    default adapter, as without the argument.
    """
    from lightning_peft.fsdp import refuse_sharded

    refuse_sharded(model, "load_adapter")  # its copies write whole tensors
    if adapter_name is not None and adapter_name != "default":
        return _load_named(model, Path(directory), strict, adapter_name)
    config, tensors, where = _read_adapter(directory)
    config_where = str(Path(directory) / ADAPTER_CONFIG_NAME)
    method = method_for_peft_type(config.get("peft_type"), config_where)
    prefix = method.file_prefix
    _, root = _transformers_root(model)
    file_keys = {k[len(prefix):] if k.startswith(prefix) else k: k for k in tensors}
    peft_keys = None if _written_here(where) else file_keys  # may hold PEFT's embedding weights
    if len(file_keys) != len(tensors):
        raise ValueError(f"{where}: tensor names collide once the {prefix!r} prefix is removed")
    by_key = {key: tensors[full] for key, full in file_keys.items() if full.startswith(prefix)}
    foreign = {full: tensors[full] for full in tensors if not full.startswith(prefix)}

    present = [get_method(m.file_format) if m.file_format else m for m in methods_in(root)]
    if any(m is not method for m in present):
        raise ValueError(f"{where} holds a {method.peft_type} adapter but the model carries "
                         f"{sorted({m.peft_type for m in present})}; load it into a model without "
                         f"adapters or with the same method's. Nothing was loaded; the model is unchanged.")
    inject = not present
    update = None
    if inject:
        with targets_from_file(), _config_values(config_where):
            injector = method.from_json(root, config, config_where)
            clone = _meta_structure(root)
            injector(clone)  # (a structure on the meta device: it builds what the config asks for)
        expected = _file_entries(clone, peft_keys)
        saved = [n for n, m in clone.named_modules() if isinstance(m, ModulesToSave)]
    else:
        if method.update_from_json is not None:
            with targets_from_file(), _config_values(config_where):
                update = method.update_from_json(root, config, config_where)
        expected = _file_entries(root, peft_keys)
        saved = [n for n, m in root.named_modules() if isinstance(m, ModulesToSave)]
    by_key = _drop_peft_duplicates(by_key, saved, expected)
    checked = dict(_validate({prefix + k: v[1] for k, v in expected.items()},
                             {**{prefix + k: v for k, v in by_key.items()}, **foreign}, strict, where,
                             keys=True))
    if method.check_tensors is not None:  # the method's own checks (e.g. FishMask's indices)
        method.check_tensors(root, {k[len(prefix):]: v for k, v in checked.items() if k.startswith(prefix)},
                             where)

    if inject:
        with targets_from_file():
            injector(root)
        entries = _file_entries(root, peft_keys)
    else:
        entries = expected
    pairs = [(entries[k][1], checked[prefix + k]) for k in by_key if k in entries]
    with _unmerged(root), targets_from_file():
        if update is not None:
            update()
        _copy(pairs)
    return model


def _load_named(model: nn.Module, directory: Path, strict: bool, adapter_name: str) -> nn.Module:
    """:func:`load_adapter` into the named adapter ``adapter_name``."""
    if not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name must be a string, got {adapter_name!r}")
    if (directory / adapter_name / ADAPTER_CONFIG_NAME).is_file():  # PEFT's multi-adapter layout
        directory = directory / adapter_name
    config, tensors, where = _read_adapter(directory)
    config_where = str(directory / ADAPTER_CONFIG_NAME)
    method = method_for_peft_type(config.get("peft_type"), config_where)
    if not method.named_adapters:
        raise ValueError(f"{where} holds a {method.peft_type} adapter, which has no named adapters; load it "
                         f"without adapter_name")
    prefix = method.file_prefix
    _, root = _transformers_root(model)
    present = [get_method(m.file_format) if m.file_format else m for m in methods_in(root)]
    if not present or any(m is not method for m in present):
        raise ValueError(f"{where}: a named {method.peft_type} adapter lives beside the default one, but the "
                         f"model carries {sorted({m.peft_type for m in present}) or 'no adapter'}; load the "
                         f"default adapter first (load_adapter(model, directory) or apply_lora). Nothing was "
                         f"loaded; the model is unchanged.")
    by_key = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    if len(by_key) != len(tensors):
        raise ValueError(f"{where}: tensor names collide once the {prefix!r} prefix is removed")
    peft_keys = {} if _written_here(where) else by_key  # may hold PEFT's embedding weights
    exists = adapter_name in _named_adapters(root)
    update = None
    if exists:
        if method.update_from_json is not None:
            with targets_from_file():
                update = method.update_from_json(root, config, config_where, adapter_name=adapter_name)
        expected = {**_named_entries(root, adapter_name), **_embedding_weights(root, peft_keys)}
    else:
        with targets_from_file():
            injector = method.from_json(root, config, config_where, adapter_name=adapter_name)
            clone = _meta_structure(root)
            injector(clone)
        expected = {**_named_entries(clone, adapter_name), **_embedding_weights(clone, peft_keys)}
    checked = dict(_validate({k: v[1] for k, v in expected.items()}, by_key, strict, where, keys=True))
    if not exists:
        with targets_from_file():
            injector(root)
    entries = {**_named_entries(root, adapter_name), **_embedding_weights(root, peft_keys)}
    pairs = [(entries[k][1], checked[k]) for k in checked if k in entries]
    with _unmerged(root), targets_from_file():
        if update is not None:
            update()
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
    _check_common_fields(config, str(config_path))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(weights_path)!r} is not a readable safetensors file: {err}") from err
    _check_binding(config, metadata.get(_BOUND_KEY), str(config_path), str(weights_path))
    return config, tensors, str(weights_path)


def _written_here(weights_path: str) -> bool:
    """Whether the weights file carries the config record :func:`save_adapter` writes (files of
    HF PEFT and other tools do not)."""
    from safetensors import safe_open

    with safe_open(weights_path, framework="pt") as file:
        return _BOUND_KEY in (file.metadata() or {})


def _check_common_fields(config: dict[str, Any], where: str) -> None:
    """The fields every PEFT config has: ``peft_type`` a string, the descriptive ones strings or
    null, ``inference_mode`` a boolean. The method checks its own fields."""
    if not isinstance(config.get("peft_type"), str):
        raise ValueError(f"{where}: peft_type must be a string naming the method (e.g. 'LORA'), got "
                         f"{config.get('peft_type')!r}")
    for key in ("task_type", "base_model_name_or_path", "revision"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise ValueError(f"{where}: {key} must be a string or null, got {config[key]!r}")
    if "inference_mode" in config and not isinstance(config["inference_mode"], bool):
        raise ValueError(f"{where}: inference_mode must be true or false (a JSON boolean), got "
                         f"{config['inference_mode']!r}")


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
    differ = [f"{k} is {config.get(k)!r} in {config_path} but {recorded[k]!r} in the weights' "
              f"metadata" for k in sorted(recorded) if not _same_field(k, config.get(k), recorded[k])]
    if differ:
        raise ValueError(f"{weights_path}: the config does not belong to these weights: {'; '.join(differ)} "
                         f"({_BOUND_KEY!r} records the config they were saved with). The two files come "
                         f"from different saves, or the config was edited after saving. Nothing was "
                         f"loaded; the model is unchanged.")


_SET_FIELDS = frozenset({"target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"})
"""Config fields whose lists HF PEFT treats as sets (its configs hold the first three as Python
sets, so a config PEFT writes again lists them in any order)."""


def _same_field(key: str, given: Any, recorded: Any) -> bool:
    if key in _SET_FIELDS and isinstance(given, list) and isinstance(recorded, list) \
            and all(isinstance(e, str) for e in given + recorded):
        return set(given) == set(recorded)
    return given == recorded


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


def _file_entries(root: nn.Module, given: Mapping[str, Any] | None = None) -> dict[str, tuple[str, Tensor]]:
    """``{file key without the prefix: (name in root, tensor)}`` for the adapter of ``root``: each
    adapter layer's parameters and persistent buffers under ``<layer path>.<layer.file_key(name)>``
    (LoRA ``<path>.lora_A.weight``, IA3 ``<path>.ia3_l``, a module trained in full under its own
    path, BatchNorm statistics included; a layer with ``keys_from_root`` under ``file_key`` alone,
    as HF PEFT's ``prompt_embeddings``; a layer's ``file_tensors()`` instead of its tensors where it
    gives them), then the trainable biases under their own names. Loading a file written by HF
    PEFT (``given``: its keys) adds the embedding weights of :func:`_embedding_weights` it holds."""
    entries: dict[str, tuple[str, Tensor]] = {}
    computed: set[int] = set()
    for name, module in root.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        dot = f"{name}." if name else ""
        tensors = module.file_tensors()
        if tensors is None:
            tensors = {**module.adapter_parameters(),
                       **{n: b for n, b in module.adapter_buffers().items() if _persistent(module, n)}}
        else:  # computed tensors stand for the layer's parameters (P-tuning's encoder outputs)
            computed.update(id(p) for p in module.adapter_parameters().values())
        for attr, tensor in tensors.items():
            key = module.file_key(attr) if module.keys_from_root else dot + module.file_key(attr)
            entries[key] = (dot + attr, tensor)
    covered = {id(tensor) for _, tensor in entries.values()} | computed
    for name, param in adapter_named_parameters(root):
        if id(param) not in covered:
            entries[name] = (name, param)
    if given is not None:
        entries.update((k, v) for k, v in _embedding_weights(root, given).items() if k not in entries)
    return entries


def _embedding_weights(root: nn.Module, given: Mapping[str, Any]) -> dict[str, tuple[str, Tensor]]:
    """The weights of ``root``'s input and output embeddings among the file keys ``given``
    (``lm_head.base_layer.weight``, ``model.embed_tokens.weight``): HF PEFT's ``save_pretrained``
    writes them beside the adapter when an embedding is a target or the vocabulary was resized
    (``save_embedding_layers="auto"``), and its loading copies them into the model, as ours does
    (the same values unless the vocabulary was resized and trained)."""
    prefixes = tuple(n + "." for kind in ("input", "output") for n in embedding_names(root, kind))
    if not prefixes:
        return {}
    tensors = {**dict(root.named_parameters(remove_duplicate=False)),
               **dict(root.named_buffers(remove_duplicate=False))}
    return {k: (k, tensors[k]) for k in given if k in tensors and k.startswith(prefixes)}


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
        problems.append(f"{len(missing)} missing ({first_names(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected ({first_names(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped ({first_names(wrong)})")
    if nonfinite:
        problems.append(f"{len(nonfinite)} non-finite ({first_names(nonfinite)})")
    if problems:
        raise ValueError(f"{where} does not match the model's adapter: " + "; ".join(problems)
                         + ". Nothing was loaded; the model is unchanged." + hint)
    return [(name if keys else expected[name], src) for name, src in cast.items()]


@contextmanager
def _unmerged(model: nn.Module) -> Iterator[None]:
    """Unmerge the merged adapter layers of ``model`` for the block, then merge them again."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and getattr(m, "merged", False)]
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
