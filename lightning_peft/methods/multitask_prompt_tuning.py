"""Multitask prompt tuning (MPT): one prompt shared by several tasks, modulated per task by a
low-rank matrix (Wang et al., 2023, arXiv 2303.02861)::

    prompt_t = P ∘ (u_t · v_t)        P (n, d) shared, u_t (n, r), v_t (r, d) for task t, ∘ elementwise

Each batch row names its task (``task_ids`` (B,), a batch key / forward keyword, e.g.
``model(input_ids, task_ids=...)``, or :func:`use_task_ids` around ``generate()``; with a single
task it may be left out). Training runs on
several source tasks; a new (target) task then starts from the source checkpoint (HF PEFT's
``prompt_tuning_init`` options): ``"average_source_tasks"`` (P, and u, v averaged over the
source tasks), ``"exact_source_task"`` (P, and u, v of source task ``init_task``),
``"only_source_shared"`` (P only), besides ``"random"`` and ``"text"`` (as prompt tuning). P
starts as prompt tuning's; u and v are drawn from N(0, 0.02²) (PEFT's).

Files are HF PEFT's (``peft_type`` ``"MULTITASK_PROMPT_TUNING"``): ``prompt_embeddings`` (n, d) = P,
``prefix_task_cols`` (tasks, n, r) = u, ``prefix_task_rows`` (tasks, r, d) = v. A file written
after a source-initialised start records ``prompt_tuning_init`` as ``"RANDOM"``: PEFT reads the
source file again whenever it loads a config naming one (even in inference mode), and the file
holds every tensor anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.methods import Method, register
from lightning_peft.methods._virtual_tokens import (
    VirtualTokens,
    check_choice,
    check_common_json,
    check_num_virtual_tokens,
    common_json,
    install,
    prompt_layer,
    read_modules_to_save,
    token_dim,
    tokenizer_name,
    transformers_root,
)
from lightning_peft.methods.prompt_tuning import _check_text, init_from_ids, read_init_json, text_ids
from lightning_peft.targeting import check_module_names

INITS = ("random", "text", "average_source_tasks", "exact_source_task", "only_source_shared")
_UPPER = {name: name.upper() for name in INITS}
_FROM_SOURCE = ("average_source_tasks", "exact_source_task", "only_source_shared")


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


@dataclass
class MultitaskPromptTuningConfig:
    """What :func:`apply_multitask_prompt_tuning` injects."""

    num_virtual_tokens: int = 20
    """n, the number of virtual tokens."""
    num_tasks: int = 1
    """How many tasks share the prompt (``task_ids`` lie in ``[0, num_tasks)``)."""
    num_ranks: int = 1
    """r, the rank of each task's matrix u_t·v_t."""
    init: str = "random"
    """``"random"``, ``"text"``, or a start from a source checkpoint (``source``):
    ``"average_source_tasks"``, ``"exact_source_task"``, ``"only_source_shared"``."""
    init_text: str | None = None
    """The text for ``init="text"``."""
    tokenizer_name_or_path: str | None = None
    """The tokenizer of ``init_text`` (unless a tokenizer object is passed to apply)."""
    source: str | None = None
    """The source MPT adapter: a directory written by ``save_adapter``/PEFT's ``save_pretrained``,
    or its ``.safetensors`` file (HF PEFT's ``prompt_tuning_init_state_dict_path``)."""
    init_task: int = 0
    """The source task for ``init="exact_source_task"``."""
    modules_to_save: list[str] | None = None
    """Modules trained in full, as trainable copies (a fresh classifier head: ``["classifier"]``)."""

    def __post_init__(self) -> None:
        check_num_virtual_tokens(self.num_virtual_tokens)
        for name in ("num_tasks", "num_ranks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.init = check_choice(self.init, "init", INITS)
        _check_text(self.init, self.init_text, self.tokenizer_name_or_path)
        if self.init in _FROM_SOURCE and not self.source:
            raise ValueError(f"init={self.init!r} needs source (the source MPT adapter directory or file)")
        if self.source is not None and (not isinstance(self.source, (str, Path))
                                        or self.init not in _FROM_SOURCE):
            raise ValueError(f"source is only used with init in {list(_FROM_SOURCE)} (a path), got "
                             f"source={self.source!r} with init={self.init!r}")
        if self.source is not None:
            self.source = str(self.source)
        if isinstance(self.init_task, bool) or not isinstance(self.init_task, int) or self.init_task < 0:
            raise ValueError(f"init_task must be a non-negative task index, got {self.init_task!r}")
        self.modules_to_save = check_module_names(self.modules_to_save, "modules_to_save")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# 2. Module
# --------------------------------------------------------------------------------------------


class MultitaskPromptEmbedding(VirtualTokens):
    """The shared prompt ``embedding`` P (n, d) and the task factors ``prefix_task_cols`` u
    (tasks, n, r), ``prefix_task_rows`` v (tasks, r, d), float32."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_tasks: int, num_ranks: int,
                 device: Any = None) -> None:
        super().__init__(num_virtual_tokens, token_dim)
        kw = {"device": device, "dtype": torch.float32}
        self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, token_dim, **kw))  # (n, d)
        self.prefix_task_cols = nn.Parameter(torch.empty(num_tasks, num_virtual_tokens, num_ranks, **kw))
        self.prefix_task_rows = nn.Parameter(torch.empty(num_tasks, num_ranks, token_dim, **kw))
        self.init, self.init_text, self.tokenizer_name_or_path = "random", None, None
        self.init_task = 0
        self.reset_parameters()

    @property
    def num_tasks(self) -> int:
        return int(self.prefix_task_cols.shape[0])

    @property
    def num_ranks(self) -> int:
        return int(self.prefix_task_cols.shape[2])

    def reset_parameters(self) -> None:
        if self.embedding.is_meta:
            return
        with torch.no_grad():
            nn.init.normal_(self.embedding)
            nn.init.normal_(self.prefix_task_cols, std=0.02)
            nn.init.normal_(self.prefix_task_rows, std=0.02)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"embedding": self.embedding, "prefix_task_cols": self.prefix_task_cols,
                "prefix_task_rows": self.prefix_task_rows}

    def prompt(self, batch_size: int, task_ids: Tensor | None) -> Tensor:
        device = self.embedding.device
        if task_ids is None:
            task_ids = self.__dict__.get("_task_ids")  # set by use_task_ids (generate)
        if task_ids is None:
            if self.num_tasks != 1:
                raise ValueError(f"task_ids is needed: the prompt serves {self.num_tasks} tasks (pass "
                                 f"task_ids (batch,) as a batch key or forward keyword, or wrap "
                                 f"generate() in use_task_ids(model, task_ids))")
            task_ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        task_ids = torch.as_tensor(task_ids, device=device)
        if task_ids.dim() == 0:
            task_ids = task_ids.expand(batch_size)
        if task_ids.shape != (batch_size,) or task_ids.is_floating_point():
            raise ValueError(f"task_ids must be integer task indices of shape ({batch_size},), got "
                             f"{tuple(task_ids.shape)} {task_ids.dtype}")
        if bool(((task_ids < 0) | (task_ids >= self.num_tasks)).any()):
            raise ValueError(f"task_ids must lie in [0, {self.num_tasks}), got {task_ids.tolist()}")
        task_ids = task_ids.long()
        cols = self.prefix_task_cols.index_select(0, task_ids)  # (B, n, r)
        rows = self.prefix_task_rows.index_select(0, task_ids)  # (B, r, d)
        return self.embedding.unsqueeze(0) * torch.matmul(cols, rows)  # (B, n, d)


@contextmanager
def use_task_ids(model: nn.Module, task_ids: Tensor | Sequence[int] | int) -> Iterator[nn.Module]:
    """Within the block, calls of ``model`` without ``task_ids`` use these (``generate()`` refuses
    keyword arguments the model's ``forward`` does not name)::

        with use_task_ids(model, torch.tensor([2, 0])):
            out = model.generate(input_ids=ids, attention_mask=mask)
    """
    layer = prompt_layer(model)
    if not isinstance(layer, MultitaskPromptEmbedding):
        raise ValueError(f"{type(model).__name__} carries no multitask prompt")
    previous = layer.__dict__.get("_task_ids")
    layer.__dict__["_task_ids"] = torch.as_tensor(task_ids)
    try:
        yield model
    finally:
        layer.__dict__["_task_ids"] = previous


# --------------------------------------------------------------------------------------------
# 3. apply_multitask_prompt_tuning
# --------------------------------------------------------------------------------------------


def read_source(source: str, n: int, dim: int, ranks: int) -> dict[str, Tensor]:
    """The three tensors of a source MPT adapter (a directory or its safetensors file), checked
    against the target's n, d and r; a ``ValueError`` naming ``source`` otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(source)
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"source {source!r} is neither an adapter directory nor a safetensors file")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"source {str(file)!r} is not a readable safetensors file: {err}") from err
    needed = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise ValueError(f"source {str(file)!r} is not a multitask prompt tuning adapter: it lacks {missing}")
    p, u, v = (tensors[k] for k in needed)
    if p.dim() != 2 or u.dim() != 3 or v.dim() != 3 or u.shape[0] != v.shape[0]:
        raise ValueError(f"source {str(file)!r}: prompt_embeddings/prefix_task_cols/prefix_task_rows "
                         f"have shapes {tuple(p.shape)}/{tuple(u.shape)}/{tuple(v.shape)}")
    want = {"num_virtual_tokens": (p.shape[0], n), "token_dim": (p.shape[1], dim),
            "num_ranks": (u.shape[2], ranks)}
    wrong = [f"{k} is {got} in the source, {mine} here" for k, (got, mine) in want.items() if got != mine]
    if wrong or u.shape[1] != n or v.shape[1:] != (ranks, dim):
        raise ValueError(f"source {str(file)!r} does not fit: {'; '.join(wrong) or 'factor shapes differ'}")
    if not all(bool(torch.isfinite(t).all()) for t in (p, u, v)):
        raise ValueError(f"source {str(file)!r} holds NaN/inf")
    return {"prompt_embeddings": p.float(), "prefix_task_cols": u.float(), "prefix_task_rows": v.float()}


def apply_multitask_prompt_tuning(model: nn.Module, num_virtual_tokens: int = 20, num_tasks: int = 1,
                                  num_ranks: int = 1, init: str = "random", init_text: str | None = None,
                                  tokenizer: Any = None, source: str | None = None, init_task: int = 0,
                                  modules_to_save: Sequence[str] | None = None,
                                  config: MultitaskPromptTuningConfig | None = None) -> nn.Module:
    """Insert a multitask prompt (see the module docstring) into every input of the transformers
    model in ``model``, freeze everything else, return ``model``. Everything (the source file
    included) is checked before the model changes; applying twice is harmless."""
    cfg = config if config is not None else MultitaskPromptTuningConfig(
        num_virtual_tokens=num_virtual_tokens, num_tasks=num_tasks, num_ranks=num_ranks, init=init,
        init_text=init_text, tokenizer_name_or_path=tokenizer if isinstance(tokenizer, str) else None,
        source=source, init_task=init_task,
        modules_to_save=modules_to_save)
    tokenizer = tokenizer if tokenizer is not None else cfg.tokenizer_name_or_path
    if cfg.init == "text" and tokenizer is None:
        raise ValueError("init='text' needs a tokenizer to tokenise init_text: pass tokenizer= (an object or "
                         "a name) or tokenizer_name_or_path")
    root = transformers_root(model)
    fresh = prompt_layer(root) is None
    ids, start = None, None
    if fresh and cfg.init == "text":
        ids = text_ids(root, cfg.init_text, tokenizer, cfg.num_virtual_tokens)
    if fresh and cfg.init in _FROM_SOURCE:
        start = read_source(cfg.source, cfg.num_virtual_tokens, token_dim(root), cfg.num_ranks)
        tasks = start["prefix_task_cols"].shape[0]
        if cfg.init == "exact_source_task" and cfg.init_task >= tasks:
            raise ValueError(f"init_task={cfg.init_task} but the source has {tasks} tasks")

    def build(root: nn.Module) -> MultitaskPromptEmbedding:
        layer = MultitaskPromptEmbedding(cfg.num_virtual_tokens, token_dim(root), cfg.num_tasks,
                                         cfg.num_ranks, device=root.get_input_embeddings().weight.device)
        layer.init, layer.init_text, layer.init_task = cfg.init, cfg.init_text, cfg.init_task
        layer.tokenizer_name_or_path = tokenizer_name(tokenizer, cfg.tokenizer_name_or_path)
        if ids is not None:
            init_from_ids(layer.embedding, root, ids)
        if start is not None and not layer.embedding.is_meta:
            with torch.no_grad():
                layer.embedding.copy_(start["prompt_embeddings"])
                u, v = start["prefix_task_cols"], start["prefix_task_rows"]
                if cfg.init == "average_source_tasks":
                    u, v = u.mean(0, keepdim=True), v.mean(0, keepdim=True)
                elif cfg.init == "exact_source_task":
                    u, v = u[cfg.init_task:cfg.init_task + 1], v[cfg.init_task:cfg.init_task + 1]
                if cfg.init != "only_source_shared":  # every target task starts from the same factors
                    layer.prefix_task_cols.copy_(u.expand_as(layer.prefix_task_cols))
                    layer.prefix_task_rows.copy_(v.expand_as(layer.prefix_task_rows))
        return layer

    return install(model, MultitaskPromptEmbedding, build, cfg.num_virtual_tokens,
                   {"num_tasks": cfg.num_tasks}, modules_to_save=cfg.modules_to_save)


# --------------------------------------------------------------------------------------------
# 4. Registry entry
# --------------------------------------------------------------------------------------------


def _to_json(root: nn.Module) -> dict[str, Any]:
    layer = prompt_layer(root)
    assert isinstance(layer, MultitaskPromptEmbedding)
    init = layer.init
    if init in _FROM_SOURCE or (init == "text" and layer.tokenizer_name_or_path is None):
        init = "random"
    return {**common_json(root, layer), "prompt_tuning_init": _UPPER[init],
            "prompt_tuning_init_text": layer.init_text,
            "tokenizer_name_or_path": layer.tokenizer_name_or_path, "tokenizer_kwargs": None,
            "prompt_tuning_init_state_dict_path": None, "prompt_tuning_init_task": layer.init_task,
            "num_ranks": layer.num_ranks, "num_tasks": layer.num_tasks}


def _shape_fields(config: dict[str, Any], where: str) -> tuple[int, int]:
    values = []
    for key in ("num_tasks", "num_ranks"):
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
        values.append(value)
    return values[0], values[1]


def _from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    root = transformers_root(model)
    n = check_common_json(root, config, where)
    tasks, ranks = _shape_fields(config, where)
    init, text, tok = read_init_json(config, where, _UPPER)
    saved = read_modules_to_save(root, config, where)

    def inject(target: nn.Module) -> None:  # the weights come from the file: no source is read
        apply_multitask_prompt_tuning(target, config=MultitaskPromptTuningConfig(
            num_virtual_tokens=n, num_tasks=tasks, num_ranks=ranks, modules_to_save=saved))
        layer = prompt_layer(transformers_root(target))
        layer.init = "random" if init in _FROM_SOURCE else init
        layer.init_text, layer.tokenizer_name_or_path = text, tok

    return inject


def _update_from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[], None]:
    root = transformers_root(model)
    n = check_common_json(root, config, where)
    tasks, ranks = _shape_fields(config, where)
    layer = prompt_layer(root)
    if (layer.num_virtual_tokens, layer.num_tasks, layer.num_ranks) != (n, tasks, ranks):
        raise ValueError(f"{where}: num_virtual_tokens/num_tasks/num_ranks are {(n, tasks, ranks)} but the "
                         f"model's prompt has {(layer.num_virtual_tokens, layer.num_tasks, layer.num_ranks)}")
    return lambda: None


def _detect(model: nn.Module) -> bool:
    return any(isinstance(m, MultitaskPromptEmbedding) for m in model.modules())


METHOD = register(Method(
    name="multitask_prompt_tuning",
    config_class=MultitaskPromptTuningConfig,
    peft_type="MULTITASK_PROMPT_TUNING",
    apply=apply_multitask_prompt_tuning,
    detect=_detect,
    to_json=_to_json,
    from_json=_from_json,
    update_from_json=_update_from_json,
    bound_fields=("peft_type", "num_virtual_tokens", "token_dim", "num_tasks", "num_ranks"),
    file_prefix="",
    aliases=("mpt",),
))

__all__ = ["METHOD", "MultitaskPromptEmbedding", "MultitaskPromptTuningConfig",
           "apply_multitask_prompt_tuning", "use_task_ids"]
