"""Which modules a PEFT method touches.

``target_modules`` may be
- a list of names: a module matches when its full dotted name equals an entry or ends with
  ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- a string: a regular expression that must match the full dotted name (``re.fullmatch``);
- ``"all-linear"``: every ``nn.Linear`` and transformers ``Conv1D`` except the output head;
- ``None``: the per-architecture default of :data:`DEFAULT_TARGETS` (HF PEFT's table); error
  messages then say that the ``target_modules`` they name was the default.
``exclude_modules`` takes the same list/regex forms and removes matches.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator, Sequence

from torch import nn

import kernels
from lightning_peft._base import AdapterLayer

TargetSpec = str | Sequence[str] | None

DEFAULT_TARGETS: dict[str, list[str] | str] = {
    # HF PEFT 0.21.2's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, entry for entry
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],  # DeBERTa v1 fuses q/k/v into one in_proj
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",  # a regex, as in PEFT
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    # beyond PEFT's table: architectures with the Llama layout, and Phi-3, whose attention has one
    # fused qkv_proj (PEFT has no phi3 entry; q_proj/v_proj would match nothing there)
    **{t: ["q_proj", "v_proj"] for t in ("qwen2_moe", "qwen3_moe", "olmo", "olmo2", "granite", "smollm3")},
    "phi3": ["qkv_proj"],
}
"""Default ``target_modules`` per transformers ``model_type``: HF PEFT's table (the same modules for
every model type PEFT knows) plus the Llama-like architectures above and Phi-3's fused
``qkv_proj``. Entries are name lists, or a regex string (``gemma4``)."""


def conv1d_class() -> type | None:
    """transformers' GPT-2 ``Conv1D`` (weight stored (in, out)), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:
        return None
    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (bitsandbytes' 4-bit ``Linear4bit`` included), transformers ``Conv1D``, or a
    4-bit layer whose ``weight`` is a :class:`kernels.NF4Tensor` (our ``NF4Linear``): the layer
    types LoRA-style methods wrap. A quantized base is recognised by its weight, not its class, so
    this module imports no method. Adapter layers themselves are not linear-like."""
    if isinstance(module, AdapterLayer):
        return False
    conv1d = conv1d_class()
    return (isinstance(module, nn.Linear)
            or isinstance(getattr(module, "weight", None), kernels.NF4Tensor)
            or (conv1d is not None and isinstance(module, conv1d)))


def model_type(model: nn.Module) -> str | None:
    """The transformers ``config.model_type`` of ``model`` or of the first submodule that has one."""
    for module in model.modules():
        config = getattr(module, "config", None)
        kind = getattr(config, "model_type", None)
        if isinstance(kind, str):
            return kind
    return None


def embedding_names(model: nn.Module, kind: str) -> list[str]:
    """Names in ``model`` of the ``kind`` ("input" or "output") embeddings that the transformers
    models inside it give (``get_input_embeddings()``/``get_output_embeddings()``), outermost
    first; a model whose getter raises (one without that embedding) gives none."""
    by_id = {id(m): n for n, m in model.named_modules()}
    names: list[str] = []
    for module in model.modules():
        getter = getattr(module, f"get_{kind}_embeddings", None)
        if callable(getter):
            try:
                found = getter()
            except (NotImplementedError, AttributeError):
                found = None
            name = by_id.get(id(found)) if found is not None else None
            if name and name not in names:
                names.append(name)
    return names


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of output heads (``get_output_embeddings()`` of any transformers model inside)."""
    heads = set(embedding_names(model, "output"))
    if not heads:  # plain models: a top-level lm_head
        heads = {n for n, _ in model.named_modules() if n.split(".")[-1] in ("lm_head",)}
    return heads


def _matcher(spec: str | Sequence[str], arg: str) -> Callable[[str], bool]:
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{arg}={spec!r} is not a valid regular expression: {err}") from err
        return lambda name: pattern.fullmatch(name) is not None
    entries = list(spec)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"{arg} must be a non-empty list of module names, a regex string or "
                         f"'all-linear', got {spec!r}")
    return lambda name: any(name == e or name.endswith("." + e) for e in entries)


def _adapter_owned(model: nn.Module) -> list[str]:
    """Names of the subtrees of ``model`` that belong to adapter layers: every child of an adapter
    layer, except its ``base_layer`` where that wraps a block rather than one linear layer (an
    attention module, an MLP): the block's linears are the model's own and stay targetable."""
    owned = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            base = getattr(module, "base_layer", None)
            wraps_block = isinstance(base, nn.Module) and not isinstance(base, AdapterLayer) \
                and not is_linear_like(base)
            owned += [f"{name}.{child}" if name else child for child, _ in module.named_children()
                      if not (wraps_block and child == "base_layer")]
    return owned


def _inside_adapter(name: str, owned: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in owned)


def describe_linear_modules(model: nn.Module, limit: int = 12) -> str:
    """A short listing of the Linear/Conv1D modules of ``model`` for error messages."""
    names = [n for n, m in model.named_modules() if n and is_linear_like(m)]
    if not names:
        return "the model has no nn.Linear or Conv1D modules"
    leaves = sorted({n.split(".")[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"Linear/Conv1D module names: {leaves}; full names: {shown}"


_FROM_FILE = contextvars.ContextVar("lightning_peft_targets_from_file", default=False)


@contextlib.contextmanager
def targets_from_file() -> Iterator[None]:
    """Within the block, list entries of ``target_modules``/``exclude_modules`` may match nothing
    (:func:`find_targets`): an adapter file's lists are read as HF PEFT reads them, which needs
    only one entry to match (configs list names of several architectures)."""
    token = _FROM_FILE.set(True)
    try:
        yield
    finally:
        _FROM_FILE.reset(token)


def check_every_entry(model: nn.Module, entries: object, arg: str, some_may_miss: bool = False) -> None:
    """A ``ValueError`` naming ``arg`` when an entry of the list ``entries`` (exact or dotted-suffix
    names) matches no module of ``model`` outside adapter layers, listing the linear layers that
    exist; ``some_may_miss``: only when some entries match and others do not. Nothing is checked for
    a string (a regex) or inside :func:`targets_from_file`."""
    if not isinstance(entries, (list, tuple)) or _FROM_FILE.get():
        return
    owned = _adapter_owned(model)
    names = [n for n, _ in model.named_modules() if n and not _inside_adapter(n, owned)]
    missing = [e for e in entries if not any(n == e or n.endswith("." + e) for n in names)]
    if missing and not (some_may_miss and len(missing) == len(entries)):
        several = len(missing) > 1
        raise ValueError(f"{arg} entr{'ies' if several else 'y'} {', '.join(map(repr, missing))} of "
                         f"{list(entries)!r} match{'' if several else 'es'} no module of "
                         f"{type(model).__name__}. {describe_linear_modules(model)}")


def find_targets(model: nn.Module, target_modules: TargetSpec = None,
                 exclude_modules: TargetSpec = None, every_entry: bool = True) -> list[str]:
    """Full names of the modules of ``model`` selected by ``target_modules``/``exclude_modules``.

    Modules already wrapped by an adapter layer are returned (so that re-applying is idempotent;
    under ``"all-linear"`` only adapter layers around a linear); nothing inside an adapter layer
    is, except the modules of a block an adapter layer wraps (an attention module's q/k/v/o
    projections are selected as anywhere else). Raises ``ValueError`` when nothing
    matches, listing the Linear/Conv1D modules that exist, and when a matched module is not a
    Linear/Conv1D. With ``every_entry`` (and outside :func:`targets_from_file`), each entry of a
    ``target_modules`` or ``exclude_modules`` list must match a module: a misspelt name is an
    error, not a layer silently left out (or in); a method's per-architecture defaults pass
    ``every_entry=False``. An explicit ``[]`` selects nothing (a method that trains other modules
    only).
    """
    if isinstance(target_modules, (list, tuple)) and not target_modules:
        return []
    adapters = _adapter_owned(model)
    given = {"target_modules": target_modules if every_entry else None, "exclude_modules": exclude_modules}
    spec = f"target_modules={target_modules!r}"  # how error messages name what selected modules
    if target_modules is None:
        kind = model_type(model)
        if kind not in DEFAULT_TARGETS:
            raise ValueError(
                f"target_modules was not given and there is no default for model type {kind!r} "
                f"(defaults exist for {sorted(DEFAULT_TARGETS)}); name the layers to adapt, e.g. "
                f"target_modules=['q_proj', 'v_proj'] or 'all-linear'. {describe_linear_modules(model)}")
        target_modules = DEFAULT_TARGETS[kind]
        spec = (f"target_modules was not given; the default target_modules of model type {kind!r} "
                f"({target_modules!r})")
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"  # as PEFT
    heads = _output_head_names(model) if all_linear else set()
    match = (lambda name: True) if all_linear else _matcher(target_modules, "target_modules")
    exclude = _matcher(exclude_modules, "exclude_modules") if exclude_modules is not None else None
    for arg, entries in given.items():  # (a target list matching nothing gets the error below)
        check_every_entry(model, entries, arg, some_may_miss=arg == "target_modules")
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or _inside_adapter(name, adapters) or not match(name):
            continue
        if exclude is not None and exclude(name):
            continue
        if isinstance(module, AdapterLayer):
            # "all-linear" takes an adapter layer only where it wraps a linear (not an embedding's
            # trainable rows or an attention block); a name picks it whatever it wraps
            if not all_linear or (is_linear_like(getattr(module, "base_layer", None))
                                  and name not in heads):  # (a tied head's token rows wrap it)
                chosen.append(name)
        elif is_linear_like(module):
            if name not in heads:
                chosen.append(name)
        elif not all_linear:
            raise ValueError(
                f"{spec} matched {name!r}, a {type(module).__name__}; only nn.Linear, "
                f"transformers Conv1D and 4-bit NF4 layers can be adapted. "
                f"{describe_linear_modules(model)}")
    if not chosen:
        raise ValueError(
            f"{spec}"
            + (f" (exclude_modules={exclude_modules!r})" if exclude_modules is not None else "")
            + f" matched no module of {type(model).__name__}; pass target_modules (names, a regex or "
              f"'all-linear'). {describe_linear_modules(model)}")
    return chosen


def find_modules(model: nn.Module, names: Sequence[str], arg: str) -> list[str]:
    """Full names of modules matching a list of names (exact or dotted suffix), e.g. for
    ``modules_to_save``; raises ``ValueError`` naming ``arg`` for an entry that matches nothing."""
    if isinstance(names, str):
        names = [names]
    adapters = _adapter_owned(model)
    found: list[str] = []
    for entry in names:
        hits = [n for n, _ in model.named_modules()
                if n and (n == entry or n.endswith("." + entry))
                and not _inside_adapter(n, adapters)]
        if not hits:
            top = [n for n, _ in model.named_modules() if n and n.count(".") <= 1][:20]
            raise ValueError(f"{arg} entry {entry!r} matches no module; modules near the top: {top}")
        found.extend(h for h in hits if h not in found)
    return found


def peft_modules_to_save(model: nn.Module, entries: Sequence[str] | None) -> list[str]:
    """Full names of the modules HF PEFT trains in full for a file's ``modules_to_save`` entries:
    PEFT matches an entry as a plain suffix of the module's name (``"norm"`` selects ``model.norm``
    and every layer's ``input_layernorm``; ``"head"`` selects ``lm_head``), where our own
    ``modules_to_save`` argument takes whole dotted names (:func:`find_modules`). Entries that
    match nothing are skipped, as PEFT skips them (it lists both ``"classifier"`` and ``"score"``
    for ``SEQ_CLS``, whichever the model has). Nothing inside an adapter layer is selected."""
    entries = list(dict.fromkeys(entries or []))
    adapters = _adapter_owned(model)
    chosen = [n for n, _ in model.named_modules()
              if n and any(n.endswith(e) for e in entries) and not _inside_adapter(n, adapters)]
    return [n for n in chosen if not _inside_adapter(n, [c for c in chosen if c != n])]


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of the submodule ``name`` and its attribute name there."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def short_names(chosen: list[str], names: list[str], dotted: bool) -> list[str]:
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


def check_module_spec(spec: object, arg: str, allow_empty: bool = False) -> str | list[str] | None:
    """``spec`` as a ``target_modules``-style value (None, a non-empty string, or a list of
    non-empty strings; a tuple becomes a list; with ``allow_empty`` also ``[]``, which selects
    nothing), or a ``ValueError`` naming ``arg``."""
    if spec is None:
        return None
    if allow_empty and isinstance(spec, (list, tuple)) and not spec:
        return []
    if isinstance(spec, str):
        if not spec:
            raise ValueError(f"{arg} must not be an empty string")
        if spec.lower() == "all-linear":  # in any case, as HF PEFT reads it
            return "all-linear"
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"{arg}={spec!r} is not a valid regular expression: {err}; pass a list of "
                             f"module names or a regex") from err
        return spec
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(e, str) and e for e in spec):
        return list(spec)
    raise ValueError(f"{arg} must be a list of module names, a regex string, 'all-linear' or None, "
                     f"got {spec!r}")


def check_module_names(names: object, arg: str) -> list[str] | None:
    """``names`` as a list of module names (one name becomes a list of it; empty becomes None),
    e.g. ``trainable_modules``, or a ``ValueError`` naming ``arg``."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(e, str) and e for e in names):
        raise ValueError(f"{arg} must be a list of module names (e.g. ['classifier']) or None, got {names!r}")
    return list(names) or None
