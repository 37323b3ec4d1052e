"""Instruction-tuning data: Alpaca-style records -> masked, dynamically padded batches.

A record is a JSON object with string fields ``instruction``, ``input`` (may be empty or absent)
and ``output``; other fields are ignored. A JSONL file holds one record per line (blank lines
are skipped); a ``.json`` file may hold a list of records instead.

Each record becomes ``prompt_ids + answer_ids + [eos]``: the prompt is
:func:`~lightning_peft.evaluation.encode_prompt` (the tokenizer's chat template with the
generation prompt, or the Alpaca template when it has none), the answer is the ``output`` text.
Labels are ``-100`` on the prompt (and, after collation, on the padding) and equal the input
ids on the answer and the closing EOS, so the loss trains only what the model must generate.

The plain functions (:func:`load_records`, :func:`format_prompt`, :func:`encode_example`,
:func:`collate`) work without Lightning; :class:`InstructionDataModule` wraps them for
``Trainer.fit``.

Sequence classification: a record is ``{"text": str, "text_pair": str (optional), "label": int or
class name}``; :func:`load_classification_records`, :func:`encode_classification_example` and
:func:`collate_classification` (``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``)
are wrapped by :class:`ClassificationDataModule`.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft.evaluation import encode_prompt, format_prompt

__all__ = [
    "IGNORE_INDEX",
    "ClassificationDataModule",
    "InstructionDataModule",
    "ResumableLoader",
    "collate",
    "collate_classification",
    "encode_classification_example",
    "encode_example",
    "format_prompt",
    "load_classification_records",
    "load_records",
]

IGNORE_INDEX = -100
"""Label of tokens left out of the loss (``torch.nn.CrossEntropyLoss``'s default)."""

RecordSource = str | os.PathLike | Sequence[Mapping[str, Any]]
"""A JSONL/JSON file path, or a list of record mappings."""

_REQUIRED_FIELDS = ("instruction", "output")


def _check_record(record: Any, where: str) -> dict[str, str]:
    """Validate one record; return it as ``{"instruction", "input", "output"}`` strings."""
    if not isinstance(record, Mapping):
        raise ValueError(
            f"{where}: expected a JSON object with fields 'instruction', 'input', 'output', "
            f"got {type(record).__name__}"
        )
    for name in _REQUIRED_FIELDS:
        if name not in record:
            raise ValueError(
                f"{where}: missing field {name!r} (a record needs 'instruction' and 'output' "
                f"strings, and optionally an 'input' string)"
            )
    fields = {
        "instruction": record["instruction"],
        "input": record.get("input", ""),
        "output": record["output"],
    }
    if fields["input"] is None:
        fields["input"] = ""
    for name, value in fields.items():
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: field {name!r} must be a string, got {type(value).__name__} "
                f"({value!r:.60})"
            )
    return fields


def _read_items(source: RecordSource, name: str) -> tuple[list[Any], list[str]]:
    """The JSON values of ``source`` (unchecked) and, for each, where it came from
    (``file line N``, ``file item i`` or ``name[i]``); a ValueError when there are none."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{name}: no such file {str(path)!r}")
        try:  # (utf-8-sig: a byte-order mark, as Windows tools write, is dropped)
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
            wheres = [f"{path} item {i}" for i in range(len(items))]
        else:
            items, wheres = [], []
            # Split on "\n" only: str.splitlines() would also split inside a JSON string
            # holding a raw U+2028 or U+0085.
            for lineno, line in enumerate(text.split("\n"), start=1):
                if not line.strip():
                    continue
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path} line {lineno}: invalid JSON ({err.msg} at column {err.colno})"
                    ) from None
                wheres.append(f"{path} line {lineno}")
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        items = list(source)
        wheres = [f"{name}[{i}]" for i in range(len(items))]
    else:
        raise ValueError(
            f"{name} must be a path to a JSONL/JSON file or a list of records, "
            f"got {type(source).__name__}"
        )
    if not items:  # a file by its path ("source" is load_records' own name for its argument)
        what = repr(str(source)) if isinstance(source, (str, os.PathLike)) else "the list"
        raise ValueError(f"{what if name == 'source' else f'{name}: {what}'} holds no records")
    return items, wheres


def _load_with_locations(source: RecordSource, name: str) -> tuple[list[dict[str, str]], list[str]]:
    """Records of ``source`` and, for each, where it came from (``file:line N`` or ``name[i]``)."""
    items, wheres = _read_items(source, name)
    records = [_check_record(item, where) for item, where in zip(items, wheres, strict=True)]
    return records, wheres


def load_records(source: RecordSource) -> list[dict[str, str]]:
    """Load and validate instruction records from a JSONL/JSON file or a list of mappings.

    Each returned record has exactly the string fields ``instruction``, ``input`` (``""`` when
    absent) and ``output``. A malformed record raises a ValueError naming the file and line
    (or the list index) and what is wrong.
    """
    return _load_with_locations(source, "source")[0]


def encode_example(
    tokenizer: Any,
    record: Mapping[str, Any],
    max_length: int | None = None,
    truncation: bool = False,
    *,
    where: str = "record",
) -> dict[str, list[int]]:
    """Token ids and labels of one record: ``prompt + output + [eos]``, prompt masked.

    ``labels`` is ``-100`` on every prompt token and equals ``input_ids`` on the answer tokens
    and the closing EOS. If the example is longer than ``max_length``: with ``truncation`` the
    answer is cut from the end (the prompt is kept whole, and at least one answer token must
    fit); without it a ValueError naming ``where`` is raised.
    """
    fields = _check_record(record, where)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an integer >= 2 or None, got {max_length!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; the answer must end with an EOS")
    prompt = encode_prompt(tokenizer, fields["instruction"], fields["input"])
    answer = list(tokenizer(fields["output"], add_special_tokens=False)["input_ids"]) + [eos]
    total = len(prompt) + len(answer)
    if max_length is not None and total > max_length:
        if not truncation:
            raise ValueError(
                f"{where}: example is {total} tokens ({len(prompt)} prompt + {len(answer)} "
                f"answer), longer than max_length={max_length}; raise max_length or set "
                f"truncation=True"
            )
        if len(prompt) >= max_length:
            raise ValueError(
                f"{where}: the prompt alone is {len(prompt)} tokens, so no answer token fits "
                f"in max_length={max_length}; raise max_length or shorten the instruction/input"
            )
        answer = answer[: max_length - len(prompt)]
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


def collate(
    examples: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples to the longest one in the batch.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 on real tokens,
    0 on padding) and ``labels`` (padded with ``-100``), each a ``(batch, longest)`` long tensor.
    """
    if not examples:
        raise ValueError("examples is empty; a batch needs at least one example")
    if not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(
                f"examples[{row}]: input_ids has {n} tokens but labels has {len(ex['labels'])}"
            )
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _split_off_val(records: list, wheres: list[str], val_fraction: float,
                   seed: int) -> tuple[list, list[str], list, list[str]]:
    """``(train, train_wheres, val, val_wheres)``: a seeded random ``val_fraction`` of ``records``
    held out for validation, both parts in file order (nothing held out when it is 0)."""
    if val_fraction <= 0:
        return records, wheres, [], []
    n_val = round(len(records) * val_fraction)
    if n_val < 1 or n_val >= len(records):
        raise ValueError(
            f"val_fraction={val_fraction} of {len(records)} train records leaves "
            f"{n_val} for validation and {len(records) - n_val} for training; "
            f"both need at least one"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in held],
            [w for i, w in enumerate(wheres) if i not in held],
            [records[i] for i in sorted(held)], [wheres[i] for i in sorted(held)])


def _pad_token_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id to pad with")
    return int(pad)


class EpochShuffle(torch.utils.data.RandomSampler):
    """The training order of epoch ``e``, found from the epoch alone: the order a ``DataLoader``
    with ``shuffle=True`` and a generator seeded with ``seed`` gives in its epoch ``e`` (its
    ``e+1``-th iteration, each earlier one read to its end, as training reads them). Lightning
    calls :meth:`set_epoch` when each epoch starts, so a run resumed from a checkpoint at an
    epoch's end shuffles the next epoch as the uninterrupted run does (a fresh seeded loader used
    to start over at epoch 0's order). A ``RandomSampler``, so
    that under DDP Lightning puts its ``DistributedSampler`` (shuffling by epoch) in its place, as
    for any shuffling loader."""

    def __init__(self, data_source: Sequence[Any], seed: int) -> None:
        super().__init__(data_source)
        self.n, self.seed, self.epoch = len(data_source), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        for epoch in range(self.epoch + 1):
            # as the loader does each epoch: its workers' base seed, the sampler's permutation, and
            # (drawn when a whole epoch has been read) the permutation of its empty remainder
            if epoch:
                torch.randperm(self.n, generator=generator)
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.n, generator=generator)
        return iter(order.tolist())


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that a Lightning run resumes in the middle of an epoch.

    Its state is the epoch, the number of its batches the training steps had consumed and
    whether that was all of them, read from the trainer when a checkpoint is written
    (``progress``: a callable returning that dict, ``{}`` outside a fit; the loader itself cannot
    tell consumed batches from batches its workers or Lightning fetched ahead). Lightning saves
    the ``state_dict`` of a training loader that has one and hands it back to
    :meth:`load_state_dict` on ``fit(ckpt_path=...)``; the shipped data modules also keep it in
    their own state, because Lightning skips that step when the loader was built before the
    checkpoint was restored (a ``configure_optimizers`` that reads
    ``trainer.estimated_stepping_batches`` builds it). The loader's next iteration then sets its
    sampler to the epoch it resumes in (the next one after a finished epoch) and skips the
    consumed batches by their sampler indices, without loading them, so the resumed run trains on
    the batches the uninterrupted run does (a plain loader restarts the epoch, and Lightning
    warns). Under DDP Lightning rebuilds this loader with its ``DistributedSampler``, and each
    rank skips its own consumed batches."""

    def __init__(self, dataset: Any, *, progress: Callable[[], dict[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.progress = progress
        self._resume: tuple[int, int, bool] | None = None  # from a checkpoint, for the next epoch

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": e, "batches": n, "finished": bool}``: the epoch running, its batches
        consumed so far and whether they are all of its batches (``{}`` outside a fit)."""
        return dict(self.progress()) if self.progress is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume after the consumed batches in ``state_dict`` (from :meth:`state_dict`); an empty
        state (a checkpoint written outside ``fit``) leaves the loader as it is."""
        if state_dict:
            self._resume = _loader_position(state_dict)

    @property
    def _index_sampler(self) -> Any:
        # what the loader's iterators draw batch indices from: the batch sampler, wrapped while a
        # resume is pending so that its next iteration resumes
        sampler = super()._index_sampler
        return sampler if self._resume is None else _SkipConsumed(self, sampler)


def _loader_position(state: Mapping[str, Any]) -> tuple[int, int, bool]:
    """``(epoch, batches, finished)`` of a :class:`ResumableLoader` state, checked."""
    epoch, batches, finished = (state.get(k) for k in ("epoch", "batches", "finished"))
    if set(state) != {"epoch", "batches", "finished"} or not isinstance(finished, bool) or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, batches)):
        raise ValueError("the training loader's checkpoint state must be {'epoch': int >= 0, "
                         "'batches': int >= 0, 'finished': bool} as ResumableLoader.state_dict "
                         f"writes it, got {dict(state)!r}")
    return epoch, batches, finished


class _SkipConsumed:
    """The index sampler of a :class:`ResumableLoader` with a pending resume. Its next iteration
    (eager in a worker's iterator, which Lightning builds before it sets the epoch) sets the
    sampler's epoch, skips the consumed batches of an unfinished epoch, and clears the resume;
    later ones (persistent workers' iterators keep this object) iterate the sampler in full."""

    def __init__(self, loader: ResumableLoader, sampler: Any) -> None:
        self.loader, self.sampler = loader, sampler

    def __len__(self) -> int:  # the full epoch: Lightning counts the consumed batches itself
        return len(self.sampler)

    def __iter__(self):
        if self.loader._resume is None:
            yield from self.sampler
            return
        (epoch, batches, finished), self.loader._resume = self.loader._resume, None
        for sampler in (self.loader.sampler, getattr(self.loader.batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch + 1 if finished else epoch)
        it = iter(self.sampler)
        for _ in range(0 if finished else batches):
            if next(it, None) is None:
                return
        yield from it


class _BatchesDataModule(L.LightningDataModule):
    """The loaders both data modules share: seeded shuffled training batches, validation batches
    in order (``[]`` without validation records), collated by :attr:`collate_fn` with the
    tokenizer's ``pad_token_id``."""

    collate_fn: Callable[..., dict[str, Any]]
    batch_size: int
    num_workers: int
    seed: int
    pad_token_id: int
    train_dataset: list | None
    val_dataset: list | None
    val_records: list
    _resume_state: Mapping[str, Any] | None = None  # a restored checkpoint's loader position

    def _loader(self, dataset: list, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        sampler = EpochShuffle(dataset, self.seed) if shuffle else None
        kwargs = {"progress": self._position} if shuffle else {}
        loader = (ResumableLoader if shuffle else DataLoader)(
            dataset, batch_size=self.batch_size, sampler=sampler, generator=generator,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            collate_fn=functools.partial(type(self).collate_fn, pad_token_id=self.pad_token_id), **kwargs)
        if shuffle and self._resume_state:
            loader.load_state_dict(self._resume_state)
            self._resume_state = None
        return loader

    def _position(self) -> dict[str, Any]:
        """The training loader's state (:meth:`ResumableLoader.state_dict`) in the fit running
        with this module: its epoch, the batches consumed in it and whether that is all of them;
        ``{}`` outside a fit."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches": consumed,
                "finished": consumed >= trainer.num_training_batches}

    def state_dict(self) -> dict[str, Any]:
        """``{"train_loader": position}`` in a fit (see :class:`ResumableLoader`), else ``{}``."""
        position = self._position()
        return {"train_loader": position} if position else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Keep a checkpoint's training-loader position for the next training loader built."""
        position = state_dict.get("train_loader") if isinstance(state_dict, Mapping) else None
        if position:
            _loader_position(position)  # checked now, while the checkpoint loads
        self._resume_state = position or None

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) batches of the training examples."""
        self.setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Batches of the validation examples in order; ``[]`` when there is no validation."""
        if not self.val_records:
            return []
        self.setup()
        return self._loader(self.val_dataset, shuffle=False)


class InstructionDataModule(_BatchesDataModule):
    """Train/validation dataloaders of masked, dynamically padded instruction examples.

    Records are loaded and validated when the module is built (so a bad file fails at once) and
    tokenized in :meth:`setup`. The validation set is ``val`` when given; otherwise a seeded
    random ``val_fraction`` of ``train`` (``0`` means no validation). Batches are dicts of
    ``input_ids``, ``attention_mask`` and ``labels``, ready for ``model(**batch).loss`` of a
    Hugging Face causal LM.
    """

    collate_fn = staticmethod(collate)

    def __init__(
        self,
        tokenizer: Any,
        train: RecordSource,
        val: RecordSource | None = None,
        val_fraction: float = 0.0,
        max_length: int = 512,
        truncation: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            tokenizer: A Hugging Face tokenizer (with a chat template, or the Alpaca template
                is used). It needs an ``eos_token_id``; padding uses ``pad_token_id``, or the
                EOS id when there is none (padding is masked by position, not by id).
            train: Training records: a JSONL/JSON path or a list of mappings.
            val: Validation records, same forms; ``None`` to split them off ``train``.
            val_fraction: Fraction of ``train`` held out for validation when ``val`` is None,
                in ``[0, 1)``; must be 0 when ``val`` is given.
            max_length: Longest example in tokens.
            truncation: Cut over-long answers to ``max_length``; when False an over-long
                example raises a ValueError naming its line.
            batch_size: Examples per batch.
            num_workers: DataLoader worker processes.
            seed: Seed of the validation split and of the training shuffle.
        """
        super().__init__()
        if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if val is not None and val_fraction > 0:
            raise ValueError(
                f"give either val or val_fraction, not both (val_fraction={val_fraction})"
            )
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = float(val_fraction)
        self.pad_token_id = _pad_token_id(tokenizer)

        records, wheres = _load_with_locations(train, "train")
        if val is not None:
            val_records, val_wheres = _load_with_locations(val, "val")
        else:
            records, wheres, val_records, val_wheres = _split_off_val(records, wheres, val_fraction, seed)
        self.train_records: list[dict[str, str]] = records
        """Training records (after the validation split)."""
        self.val_records: list[dict[str, str]] = val_records
        """Validation records, e.g. for :func:`~lightning_peft.evaluation.generate_answers`."""
        self._train_wheres = wheres
        self._val_wheres = val_wheres
        self.train_dataset: list[dict[str, list[int]]] | None = None
        self.val_dataset: list[dict[str, list[int]]] | None = None

    def _encode_all(self, records: list[dict[str, str]], wheres: list[str]) -> list:
        """The encoded records; with ``truncation`` a warning counts the answers cut short (they
        lose their end and the closing EOS, so the model does not learn to stop there)."""
        encoded = [encode_example(self.tokenizer, r, self.max_length, self.truncation, where=w)
                   for r, w in zip(records, wheres, strict=True)]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        cut = [w for e, w in zip(encoded, wheres, strict=True) if e["input_ids"][-1] != eos]
        if cut:
            import warnings

            warnings.warn(f"{len(cut)} of {len(encoded)} records are longer than max_length="
                          f"{self.max_length} and their answers were cut (without the closing EOS), "
                          f"the first {cut[0]}; raise max_length to keep them whole", stacklevel=3)
        return encoded

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the records (once; later calls reuse the encoded examples)."""
        if self.train_dataset is None:
            self.train_dataset = self._encode_all(self.train_records, self._train_wheres)
            self.val_dataset = self._encode_all(self.val_records, self._val_wheres)


# --- Sequence classification -------------------------------------------------------------------

ClassificationRecord = dict[str, Any]
"""A checked classification record: ``text`` (str), ``text_pair`` (str or None), ``label`` (int)."""


def _check_classification_record(record: Any, where: str, labels: Sequence[str] | None,
                                 num_labels: int | None) -> ClassificationRecord:
    """Validate one classification record; return ``{"text", "text_pair", "label"}`` with the
    label as a class index (a string label mapped through ``labels``)."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object with fields 'text', 'label' and optionally "
                         f"'text_pair', got {type(record).__name__}")
    for name in ("text", "label"):
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (a record needs a 'text' string, a "
                             f"'label', and optionally a 'text_pair' string)")
    text, pair, label = record["text"], record.get("text_pair"), record["label"]
    for name, value in (("text", text), ("text_pair", pair)):
        if not isinstance(value, str) and not (name == "text_pair" and value is None):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__} "
                             f"({value!r:.60})")
    if isinstance(label, str):
        if labels is None:
            raise ValueError(f"{where}: label {label!r} is a string; pass labels=[...] (the class "
                             f"names, in class-index order) to map string labels to indices")
        if label not in labels:
            raise ValueError(f"{where}: unknown label {label!r}; the labels are {list(labels)}")
        index = list(labels).index(label)
    elif isinstance(label, int) and not isinstance(label, bool):
        bound = len(labels) if labels is not None else num_labels
        if label < 0 or (bound is not None and label >= bound):
            valid = f"0..{bound - 1}" if bound is not None else "an integer >= 0"
            raise ValueError(f"{where}: unknown label {label}; a class index must be {valid}")
        index = label
    else:
        raise ValueError(f"{where}: field 'label' must be an integer class index or a class name, "
                         f"got {type(label).__name__} ({label!r:.60})")
    return {"text": text, "text_pair": pair, "label": index}


def _check_label_names(labels: Sequence[str] | None, num_labels: int | None) -> list[str] | None:
    """``labels`` as a list of distinct non-empty strings (or None), consistent with ``num_labels``."""
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                   or num_labels < 2):
        raise ValueError(f"num_labels must be an integer >= 2 or None, got {num_labels!r}")
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) < 2 \
            or not all(isinstance(n, str) and n for n in labels):
        raise ValueError(f"labels must be a list of at least two class names (strings), got {labels!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must not repeat a name, got {list(labels)}")
    if num_labels is not None and num_labels != len(labels):
        raise ValueError(f"num_labels={num_labels} disagrees with the {len(labels)} names in labels")
    return list(labels)


def _load_classification(source: RecordSource, name: str, labels: Sequence[str] | None,
                         num_labels: int | None) -> tuple[list[ClassificationRecord], list[str]]:
    items, wheres = _read_items(source, name)
    records = [_check_classification_record(item, where, labels, num_labels)
               for item, where in zip(items, wheres, strict=True)]
    return records, wheres


def load_classification_records(source: RecordSource, labels: Sequence[str] | None = None,
                                num_labels: int | None = None) -> list[ClassificationRecord]:
    """Load and validate classification records from a JSONL/JSON file or a list of mappings.

    A record has a ``text`` string, an optional ``text_pair`` string (for sentence-pair tasks) and
    a ``label``: an integer class index, or a class name when ``labels`` (the names, in index
    order) is given. Each returned record is ``{"text", "text_pair" (None when absent), "label"
    (int)}``. Bad JSON, a missing or mistyped field, or an unknown label (a name not in
    ``labels``, an index outside ``0..num_labels-1``) raises a ValueError naming the file and line
    (or the list index).
    """
    return _load_classification(source, "source", _check_label_names(labels, num_labels), num_labels)[0]


def encode_classification_example(tokenizer: Any, record: Mapping[str, Any], max_length: int | None = None,
                                  truncation: bool = True, *, where: str = "record") -> dict[str, Any]:
    """Token ids of one checked record: ``tokenizer(text, text_pair)`` (with the tokenizer's special
    tokens, e.g. ``[CLS] text [SEP] pair [SEP]``), plus its ``label``.

    Returns ``input_ids``, ``token_type_ids`` when the tokenizer makes them, and ``label``. Longer
    than ``max_length``: cut (longest part first) with ``truncation``, else a ValueError naming
    ``where``.
    """
    pair = record.get("text_pair")
    kwargs: dict[str, Any] = {}
    if truncation and max_length is not None:
        kwargs = {"truncation": "longest_first", "max_length": max_length}
    encoded = tokenizer(record["text"], pair, **kwargs) if pair is not None \
        else tokenizer(record["text"], **kwargs)
    ids = list(encoded["input_ids"])
    if max_length is not None and len(ids) > max_length:
        if truncation:  # the tokenizer could not cut it: its special tokens alone do not fit
            special = tokenizer.num_special_tokens_to_add(pair=pair is not None)
            raise ValueError(f"{where}: max_length={max_length} leaves no room for a token of the text "
                             f"beside the tokenizer's {special} special tokens"
                             f"{' of a sentence pair' if pair is not None else ''}; raise max_length "
                             f"above {special}")
        raise ValueError(f"{where}: example is {len(ids)} tokens, longer than max_length={max_length}; "
                         f"raise max_length or set truncation=True")
    example: dict[str, Any] = {"input_ids": ids, "label": int(record["label"])}
    if "token_type_ids" in encoded:
        example["token_type_ids"] = list(encoded["token_type_ids"])
    return example


def collate_classification(examples: Sequence[Mapping[str, Any]],
                           pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded classification examples to the longest one in the batch.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (0 on padding),
    ``token_type_ids`` (padded with 0; only when every example has them), each ``(batch, longest)``,
    and ``labels`` ``(batch,)``: the keyword arguments of a Hugging Face sequence classifier.
    """
    if not examples:
        raise ValueError("examples is empty; a batch needs at least one example")
    if not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    with_types = all("token_type_ids" in ex for ex in examples)
    token_type_ids = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        if with_types:
            token_type_ids[row, :n] = torch.as_tensor(ex["token_type_ids"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_types:
        batch["token_type_ids"] = token_type_ids
    batch["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
    return batch


class ClassificationDataModule(_BatchesDataModule):
    """Train/validation dataloaders of dynamically padded (sentence-pair) classification examples.

    Records (see :func:`load_classification_records`) are loaded and validated when the module is
    built, so a bad file fails at once with its line named, and tokenized in :meth:`setup`. The
    validation set is ``val`` when given; otherwise a seeded random ``val_fraction`` of ``train``
    (``0`` means no validation). Batches are :func:`collate_classification` dicts, ready for
    :class:`~lightning_peft.tasks.SequenceClassificationModule`.
    """

    collate_fn = staticmethod(collate_classification)

    def __init__(
        self,
        tokenizer: Any,
        train: RecordSource,
        val: RecordSource | None = None,
        val_fraction: float = 0.0,
        labels: Sequence[str] | None = None,
        num_labels: int | None = None,
        max_length: int = 128,
        truncation: bool = True,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            tokenizer: A Hugging Face tokenizer. Padding uses its ``pad_token_id``, or the EOS id
                when there is none (the attention mask marks the padding).
            train: Training records: a JSONL/JSON path or a list of mappings.
            val: Validation records, same forms; ``None`` to split them off ``train``.
            val_fraction: Fraction of ``train`` held out for validation when ``val`` is None,
                in ``[0, 1)``; must be 0 when ``val`` is given.
            labels: Class names in index order; records may then give a name or an index as
                ``label``. ``None``: labels are integer indices.
            num_labels: Number of classes (with ``labels`` it must be ``len(labels)``). ``None``:
                ``len(labels)``, or one more than the largest index in ``train`` and ``val``.
            max_length: Longest example in tokens, special tokens included.
            truncation: Cut longer examples to ``max_length`` (the longer of text and pair first);
                when False an over-long example raises a ValueError naming its line.
            batch_size: Examples per batch.
            num_workers: DataLoader worker processes.
            seed: Seed of the validation split and of the training shuffle.
        """
        super().__init__()
        if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if val is not None and val_fraction > 0:
            raise ValueError(f"give either val or val_fraction, not both (val_fraction={val_fraction})")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        names = _check_label_names(labels, num_labels)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = float(val_fraction)
        self.pad_token_id = _pad_token_id(tokenizer)
        self.labels: list[str] | None = names
        """Class names in index order, or None when the records use indices only."""

        records, wheres = _load_classification(train, "train", names, num_labels)
        if val is not None:
            val_records, val_wheres = _load_classification(val, "val", names, num_labels)
        else:
            records, wheres, val_records, val_wheres = _split_off_val(records, wheres, val_fraction, seed)
        if names is not None:
            num_labels = len(names)
        elif num_labels is None:
            num_labels = max(2, 1 + max(r["label"] for r in records + val_records))
        self.num_labels: int = num_labels
        """Number of classes: the classifier's ``num_labels``."""
        self.train_records: list[ClassificationRecord] = records
        """Training records (after the validation split), labels as indices."""
        self.val_records: list[ClassificationRecord] = val_records
        """Validation records, labels as indices."""
        self._train_wheres = wheres
        self._val_wheres = val_wheres
        self.train_dataset: list[dict[str, Any]] | None = None
        self.val_dataset: list[dict[str, Any]] | None = None

    def _encode_all(self, records: list[ClassificationRecord], wheres: list[str]) -> list[dict[str, Any]]:
        return [encode_classification_example(self.tokenizer, r, self.max_length, self.truncation, where=w)
                for r, w in zip(records, wheres, strict=True)]

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the records (once; later calls reuse the encoded examples)."""
        if self.train_dataset is None:
            self.train_dataset = self._encode_all(self.train_records, self._train_wheres)
            self.val_dataset = self._encode_all(self.val_records, self._val_wheres)
