"""Sharded training (FSDP) of adapters: a 4-bit base that FSDP can split, sharding, full adapters.

FSDP (``torch.distributed.fsdp``) shards parameters only: a :class:`~lightning_peft.methods.qlora.NF4Linear`
keeps its 4-bit weight outside ``parameters()``, so under FSDP every rank would hold the whole
4-bit model. :class:`ShardableNF4Linear` holds the same bytes as two frozen parameters that FSDP
flattens and splits like any other (the FSDP-QLoRA approach: packed storage of one dtype):

    weight_packed  (ceil(n/2 / e),)       the packed NF4 codes, viewed as ``storage_dtype``
    weight_absmax  (ceil(blocks·a / e),)  the per-block absmax (fp32, or uint8 codes when
                                          double-quantized), viewed as ``storage_dtype``

(``e`` the element size of ``storage_dtype``, ``a`` that of the absmax; the tails are zero
padding.) The nested absmax, its code map and offset (1/256 of the absmax) stay replicated buffers.
With ``storage_dtype=torch.uint8`` (FSDP2, ``fully_shard``: mixed dtypes in one unit are fine) each
of ``W`` ranks holds ``1/W`` of the 4-bit bytes; FSDP1 (``FullyShardedDataParallel``,
Lightning's ``strategy="fsdp"``) flattens one dtype per unit, so there the storage takes the dtype
of the unit's other parameters (``bfloat16`` under ``precision="bf16-true"``). Inside the forward
(and backward) FSDP has gathered the full parameters and ``weight`` is the whole
:class:`kernels.NF4Tensor` built over them, bit for bit the unsharded one. Dtype casts
(``.half()``, "bf16-true") never touch the stored bytes; device moves do.

:func:`fully_shard_peft` is the FSDP2 recipe for a model with adapters (inject first, then shard:
FSDP2 manages only the parameters present when ``fully_shard`` runs). :func:`full_adapter_tensors`
gathers each sharded adapter tensor to its full value (a collective: every rank calls it);
:func:`lightning_peft.save_adapter` uses it, so it writes the full adapter on rank 0 under FSDP1,
FSDP2 or DeepSpeed ZeRO-3, never a shard or an empty tensor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

import kernels
from lightning_peft.methods.qlora import NF4Linear, _zero_nf4

__all__ = ["ShardableNF4Linear", "clean_name", "full_adapter_tensors", "fully_shard_peft",
           "is_sharded", "prepare_nf4_for_fsdp", "rank"]

_STORAGE = ("weight_packed", "weight_absmax")
_NESTED = ("weight_nested_absmax", "weight_nested_code", "weight_nested_offset")
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _as_storage(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` (1-D) as bytes, zero-padded to whole elements of ``dtype`` and viewed as it (a copy)."""
    raw = t.detach().reshape(-1).contiguous().view(torch.uint8)
    size = torch.empty((), dtype=dtype).element_size()
    pad = (-raw.numel()) % size
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.clone().view(dtype)


def _from_storage(t: Tensor, dtype: torch.dtype, numel: int) -> Tensor:
    """The first ``numel`` elements of ``dtype`` in the bytes of ``t`` (a view, no copy)."""
    return t.reshape(-1).view(torch.uint8)[:numel * torch.empty((), dtype=dtype).element_size()].view(dtype)


class ShardableNF4Linear(NF4Linear):
    """An :class:`~lightning_peft.methods.qlora.NF4Linear` whose 4-bit bytes are frozen parameters
    (``weight_packed``, ``weight_absmax``) that FSDP shards; ``weight`` is the
    :class:`kernels.NF4Tensor` over them (only whole while FSDP has them gathered, i.e. inside
    forward/backward, or when unsharded). Build one with :meth:`from_nf4_linear`; its state dict
    holds the storage parameters and nested buffers under their own names (what FSDP checkpoints
    shard)."""

    storage_dtype: torch.dtype

    @classmethod
    def from_nf4_linear(cls, layer: NF4Linear, storage_dtype: torch.dtype = torch.uint8
                        ) -> ShardableNF4Linear:
        """The same layer (same bytes, bias ``Parameter``, compute dtype) in shardable storage."""
        if not isinstance(layer, NF4Linear):
            raise TypeError(f"layer must be an NF4Linear, got {type(layer).__name__}")
        if not isinstance(storage_dtype, torch.dtype) or storage_dtype.is_complex:
            raise ValueError(f"storage_dtype must be a real torch dtype (torch.uint8 for FSDP2, the "
                             f"unit's parameter dtype for FSDP1), got {storage_dtype!r}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.compute_dtype = layer.compute_dtype
        new.storage_dtype = storage_dtype
        new.weight = layer.weight
        new.bias = layer.bias
        new.train(layer.training)
        return new

    # ---------------------------------------------------------------------------- the NF4 weight
    @property
    def weight(self) -> kernels.NF4Tensor:
        """The NF4 weight over the storage parameters; while they are sharded (outside FSDP's
        gathered forward/backward), a placeholder of the same shape and format on the meta device
        (it says what the layer is; any computation with it fails)."""
        meta = self._nf4_meta
        absmax_dtype = torch.uint8 if meta["double_quant"] else torch.float32
        if not self.is_whole():
            return _zero_nf4(meta["shape"], meta["blocksize"], meta["double_quant"], meta["dtype"], "meta")
        nested = {}
        if meta["double_quant"]:
            nested = dict(nested_absmax=self.weight_nested_absmax, nested_code=self.weight_nested_code,
                          nested_offset=self.weight_nested_offset)
        return kernels.NF4Tensor(_from_storage(self.weight_packed, torch.uint8, meta["packed"]),
                                 _from_storage(self.weight_absmax, absmax_dtype, meta["blocks"]),
                                 meta["shape"], meta["dtype"], meta["blocksize"], **nested)

    @weight.setter
    def weight(self, q: kernels.NF4Tensor) -> None:
        if not isinstance(q, kernels.NF4Tensor):
            raise TypeError(f"weight must be a kernels.NF4Tensor, got {type(q).__name__}")
        self._nf4_meta = {"shape": tuple(q.shape), "dtype": q.dtype, "blocksize": q.blocksize,
                          "double_quant": q.double_quant, "packed": q.packed.numel(),
                          "blocks": q.absmax.numel()}
        for name, t in (("weight_packed", q.packed), ("weight_absmax", q.absmax)):
            self._parameters[name] = nn.Parameter(_as_storage(t, self.storage_dtype), requires_grad=False)
        for name, t in zip(_NESTED, (q.nested_absmax, q.nested_code, q.nested_offset)):
            self._buffers[name] = None if t is None else t.detach().clone()

    def is_whole(self) -> bool:
        """Whether this process holds every stored byte (not sharded, or gathered by FSDP now)."""
        meta = self._nf4_meta
        absmax_bytes = meta["blocks"] * (1 if meta["double_quant"] else 4)
        for name, nbytes in (("weight_packed", meta["packed"]), ("weight_absmax", absmax_bytes)):
            t = self._parameters[name]
            if _is_dtensor(t) or t.numel() * t.element_size() < nbytes:
                return False
        return True

    def frozen_numel(self) -> int:
        """The 4-bit weight's elements beyond what ``parameters()`` counts of its storage, so that
        :func:`~lightning_peft.trainable_parameters` counts the logical weight, as for an ``NF4Linear``."""
        stored = sum(self._parameters[name].numel() for name in _STORAGE)
        return math.prod(self._nf4_meta["shape"]) - stored

    def storage_nbytes(self) -> int:
        """Bytes of the storage parameters held by this process (its shard under FSDP)."""
        total = 0
        for name in _STORAGE:
            t = self._parameters[name]
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
        return total

    # ---------------------------------------------------------------- casts, moves, state dict
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):
        """Device moves move the 4-bit bytes; dtype casts set only ``compute_dtype`` (and cast the
        bias), never the stored bytes and scales."""
        kept = {n: self._parameters.pop(n) for n in _STORAGE}
        kept_buffers = {n: self._buffers.pop(n) for n in _NESTED}
        try:
            nn.Module._apply(self, fn, recurse)  # the bias
        finally:
            self._parameters.update(kept)
            self._buffers.update(kept_buffers)
        device = kept["weight_packed"].device
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=device))
        if not isinstance(probe, Tensor):
            return self
        if probe.dtype in (torch.float16, torch.bfloat16, torch.float32):
            self.compute_dtype = probe.dtype
        if probe.device != device:
            with torch.no_grad():
                for param in kept.values():
                    param.data = param.data.to(probe.device)
                for name, buf in kept_buffers.items():
                    if buf is not None:
                        self._buffers[name] = buf.to(probe.device)
        return self

    _save_to_state_dict = nn.Module._save_to_state_dict
    _load_from_state_dict = nn.Module._load_from_state_dict

    def extra_repr(self) -> str:
        return super().extra_repr() + f", storage_dtype={self.storage_dtype}"


def prepare_nf4_for_fsdp(model: nn.Module, storage_dtype: torch.dtype = torch.uint8) -> nn.Module:
    """Replace every :class:`~lightning_peft.methods.qlora.NF4Linear` of ``model`` by a
    :class:`ShardableNF4Linear` holding the same bytes (in place; returns ``model``). Call it
    before sharding; layers already shardable are kept."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, NF4Linear) and not isinstance(child, ShardableNF4Linear):
                setattr(module, child_name, ShardableNF4Linear.from_nf4_linear(child, storage_dtype))
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes), else the
    members of its module lists."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def fully_shard_peft(model: nn.Module, mesh: Any = None, blocks: Iterable[nn.Module] | None = None,
                     storage_dtype: torch.dtype = torch.uint8, **fsdp_kwargs: Any) -> nn.Module:
    """Shard ``model`` (adapters already injected, e.g. by ``apply_lora``/``apply_qlora``) with
    FSDP2: its 4-bit layers made shardable (:func:`prepare_nf4_for_fsdp`), then ``fully_shard``
    on each block (default: the transformers model's ``_no_split_modules``, e.g. each
    ``LlamaDecoderLayer``) and on ``model``. ``mesh`` and ``fsdp_kwargs`` go to ``fully_shard``
    (``mp_policy``, ``reshard_after_forward``...). Returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    prepare_nf4_for_fsdp(model, storage_dtype)
    for block in (list(blocks) if blocks is not None else _blocks(model)):
        fully_shard(block, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model


# ------------------------------------------------------------------------ gathering, names
def refuse_sharded(model: nn.Module, what: str) -> None:
    """A ``ValueError`` when ``model`` is sharded (:func:`is_sharded`): ``what`` writes adapter
    tensors whole, so it runs before sharding (or after gathering)."""
    if is_sharded(model):
        raise ValueError(f"{what} works on an unsharded model, and this one is sharded (FSDP or "
                         f"DeepSpeed ZeRO-3): call it before fully_shard_peft / the strategy's setup. "
                         f"Nothing was changed.")


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP1 wraps part of ``model``, or any of its parameters is a DTensor (FSDP2) or
    partitioned by DeepSpeed ZeRO-3."""
    if not torch.distributed.is_available():  # a torch build without distributed support
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules()) or \
        any(_is_dtensor(p) or _is_zero3(p) for p in model.parameters())


def _is_zero3(t: Any) -> bool:
    return hasattr(t, "ds_id") and hasattr(t, "ds_tensor")


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def clean_name(name: str) -> str:
    """``name`` without the wrapper prefixes FSDP1 and activation checkpointing insert in module
    names (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``), which their state dicts
    leave out. (``torch.compile``'s ``_orig_mod.`` stays: its state dict keeps it.)"""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@contextlib.contextmanager
def full_adapter_tensors(model: nn.Module) -> Iterator[Callable[[Tensor], Tensor]]:
    """Inside: a function that gives the full value of an adapter tensor of ``model``.

    Under DeepSpeed ZeRO-3 the adapter parameters alone are gathered for the block
    (``deepspeed.zero.GatheredParameters``, read-only). Under FSDP1 (``use_orig_params=True``,
    Lightning's default) the parameters are gathered for
    the block with ``summon_full_params(writeback=False, rank0_only=True, offload_to_cpu=...)``
    (on a GPU the full values land in CPU memory of rank 0 only; the other ranks see their
    shards); under FSDP2 each DTensor is gathered when asked (``full_tensor()``). Both are
    collectives: every rank enters the block and asks for the same tensors in the same order.
    ``model`` must be the outermost FSDP1 wrapper (Lightning's ``trainer.strategy.model``) or
    contain it. Without sharding the function returns its argument."""
    def full(t: Tensor) -> Tensor:
        return t.full_tensor() if _is_dtensor(t) else t

    if not torch.distributed.is_available():  # a torch build without distributed support
        yield full
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    from lightning_peft._base import adapter_named_parameters

    zero3 = [p for _, p in adapter_named_parameters(model) if _is_zero3(p)]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield full
    elif units:
        offload = any(p.device.type == "cuda" for p in model.parameters())
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True,
                                                         offload_to_cpu=offload):
            yield full
    else:
        yield full
