"""Instruction data: prompt templates, loss masking, dynamic padding, splits and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_peft.data import (
    IGNORE_INDEX,
    InstructionDataModule,
    collate,
    encode_example,
    format_prompt,
    load_records,
)
from lightning_peft.evaluation import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, encode_prompt
from tests import _tiny

RECORDS = [
    {"instruction": "Extract the triples.", "input": "Marie Curie was born in Warsaw.",
     "output": "(Marie Curie | born in | Warsaw)"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Extract the triples.", "input": "Ada Lovelace lives in London.",
     "output": "(Ada Lovelace | lives in | London)"},
    {"instruction": "Name a colour.", "output": "Blue, as the sea is."},
    {"instruction": "Extract the triples.", "input": "Alan Turing studied at Cambridge.",
     "output": "(Alan Turing | studied at | Cambridge)"},
    {"instruction": "Count to three.", "input": "", "output": "one two three"},
    {"instruction": "Extract the triples.", "input": "Emmy Noether was born in Erlangen.",
     "output": "(Emmy Noether | born in | Erlangen)"},
    {"instruction": "Repeat the input.", "input": "a b c", "output": "a b c"},
]


def _tiny_tokenizer(chat_template: bool, pad_is_eos: bool = False):
    corpus = [r["instruction"] + " " + r.get("input", "") + " " + r["output"] for r in RECORDS]
    return _tiny.tokenizer(corpus, 400, chat_template, pad_is_eos)


@pytest.fixture(scope="module")
def chat_tok():
    return _tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def plain_tok():
    return _tiny_tokenizer(chat_template=False)


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- templates -------------------------------------------------------------------------------


def test_chat_template_prompt(chat_tok):
    text = format_prompt(chat_tok, "Extract the triples.", "Marie Curie was born in Warsaw.")
    assert text == (
        "<|im_start|>user\nExtract the triples.\n\nMarie Curie was born in Warsaw.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert format_prompt(chat_tok, "Say hello.", "") == (
        "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    )
    # The template's special tokens are encoded once each, not re-added.
    ids = encode_prompt(chat_tok, "Say hello.", "")
    assert chat_tok.decode(ids) == format_prompt(chat_tok, "Say hello.", "")
    assert ids.count(chat_tok.convert_tokens_to_ids("<|im_start|>")) == 2


def test_alpaca_template_without_chat_template(plain_tok):
    text = format_prompt(plain_tok, "Extract the triples.", "Ada Lovelace lives in London.")
    assert text == ALPACA_TEMPLATE.format(
        instruction="Extract the triples.", input="Ada Lovelace lives in London."
    )
    assert "### Input:\nAda Lovelace lives in London.\n\n### Response:\n" in text
    no_input = format_prompt(plain_tok, "Say hello.", "  ")
    assert no_input == ALPACA_TEMPLATE_NO_INPUT.format(instruction="Say hello.")
    assert "### Input:" not in no_input
    assert plain_tok.decode(encode_prompt(plain_tok, "Say hello.")) == no_input


# --- masking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_encode_example_masks_exactly_the_prompt(template, chat_tok, plain_tok):
    tok = chat_tok if template == "chat" else plain_tok
    for record in RECORDS:
        ex = encode_example(tok, record)
        prompt = encode_prompt(tok, record["instruction"], record.get("input", ""))
        n = len(prompt)
        assert ex["input_ids"][:n] == prompt
        assert ex["labels"][:n] == [IGNORE_INDEX] * n
        assert ex["labels"][n:] == ex["input_ids"][n:]
        assert IGNORE_INDEX not in ex["labels"][n:]
        # The supervised part is the answer text followed by the EOS.
        assert ex["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(ex["input_ids"][n:-1]) == record["output"]
        assert tok.decode(ex["input_ids"][:n]) == format_prompt(
            tok, record["instruction"], record.get("input", "")
        )


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_batches_mask_prompt_and_padding_only(pad_is_eos):
    tok = _tiny_tokenizer(chat_template=True, pad_is_eos=pad_is_eos)
    dm = InstructionDataModule(tok, RECORDS, batch_size=3, seed=1)
    dm.setup("fit")
    seen = 0
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"],
                                     batch["labels"], strict=True):
            n = int(mask.sum())
            assert mask[:n].eq(1).all() and mask[n:].eq(0).all()  # right padding
            assert ids[n:].eq(tok.pad_token_id).all()
            prompt_len = int(labels[:n].eq(IGNORE_INDEX).sum())
            prompt = ids[:prompt_len].tolist()
            matching = [
                r for r in RECORDS
                if encode_prompt(tok, r["instruction"], r.get("input", "")) == prompt
            ]
            assert matching, "the masked tokens are not a prompt"
            assert labels[:prompt_len].eq(IGNORE_INDEX).all()
            assert torch.equal(labels[prompt_len:n], ids[prompt_len:n])
            assert labels[n:].eq(IGNORE_INDEX).all()
            # The closing EOS is supervised even when the pad id is the EOS id.
            assert labels[n - 1].item() == tok.eos_token_id
            seen += 1
    assert seen == len(RECORDS)


# --- padding ---------------------------------------------------------------------------------


def test_collate_pads_to_longest_in_batch():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = collate(examples, pad_token_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="examples is empty"):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError, match=r"examples\[0\].*labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


def test_dynamic_padding_is_per_batch(chat_tok):
    dm = InstructionDataModule(chat_tok, RECORDS, batch_size=2, max_length=256)
    dm.setup("fit")
    lengths = [len(ex["input_ids"]) for ex in dm.train_dataset]
    widths = []
    covered = 0
    for batch in dm.train_dataloader():
        real = batch["attention_mask"].sum(dim=1)
        width = batch["input_ids"].shape[1]
        assert width == int(real.max())  # padded to this batch's longest, not max_length
        widths.append(width)
        covered += len(real)
    assert covered == len(RECORDS)
    assert max(widths) == max(lengths) < 256
    assert len(set(widths)) > 1


# --- splits ----------------------------------------------------------------------------------


def test_val_fraction_split_is_seeded_and_disjoint(chat_tok):
    key = json.dumps

    def split(seed):
        dm = InstructionDataModule(chat_tok, RECORDS, val_fraction=0.25, seed=seed)
        return [key(r) for r in dm.train_records], [key(r) for r in dm.val_records]

    train, val = split(0)
    assert len(val) == 2 and len(train) == 6
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(key(_full(r)) for r in RECORDS)
    assert split(0) == (train, val)
    assert any(split(seed)[1] != val for seed in (1, 2, 3))
    dm = InstructionDataModule(chat_tok, RECORDS, val_fraction=0.25, batch_size=8)
    dm.setup("fit")
    (batch,) = list(dm.val_dataloader())
    assert batch["input_ids"].shape[0] == 2


def _full(record):
    return {"instruction": record["instruction"], "input": record.get("input", ""),
            "output": record["output"]}


def test_given_val_and_no_val(chat_tok, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in RECORDS[:6]])
    val = _write_jsonl(tmp_path / "val.jsonl", [json.dumps(r) for r in RECORDS[6:]])
    dm = InstructionDataModule(chat_tok, train, val=str(val), batch_size=4)
    assert dm.val_records == [_full(r) for r in RECORDS[6:]]
    assert len(dm.train_records) == 6
    assert sum(b["input_ids"].shape[0] for b in dm.val_dataloader()) == 2
    without = InstructionDataModule(chat_tok, train)
    assert without.val_dataloader() == []
    with pytest.raises(ValueError, match="either val or val_fraction"):
        InstructionDataModule(chat_tok, train, val=val, val_fraction=0.2)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        InstructionDataModule(chat_tok, train, val_fraction=1.0)
    with pytest.raises(ValueError, match="val_fraction=0.01 of 6"):
        InstructionDataModule(chat_tok, train, val_fraction=0.01)


def test_train_shuffle_is_seeded(chat_tok):
    def first_epoch(seed):
        dm = InstructionDataModule(chat_tok, RECORDS, batch_size=8, seed=seed)
        return next(iter(dm.train_dataloader()))["input_ids"]

    assert torch.equal(first_epoch(3), first_epoch(3))


def _recorder(estimate: bool = False):
    """A LightningModule recording ``(epoch, input_ids)`` of each training batch; with
    ``estimate`` its ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``."""
    import lightning as L

    class _Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, batch["input_ids"].tolist()))
            return self.weight.square().sum() + self.weight.sum()

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            if estimate:  # builds the training loader before the checkpoint is restored
                assert self.trainer.estimated_stepping_batches > 0
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return _Recorder()


def test_shuffle_order_per_epoch_resumes_at_an_epoch_boundary(chat_tok, tmp_path):
    """Each epoch's order comes from the seed and the epoch (Lightning sets the sampler's epoch):
    the same orders as a seeded shuffling loader over its epochs, and a run resumed from the
    checkpoint at the end of epoch 0 sees epoch 1's batches as the uninterrupted run does (a fresh
    loader used to replay epoch 0's order)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    dm = InstructionDataModule(chat_tok, RECORDS, batch_size=2, seed=4)
    dm.setup()
    plain = DataLoader(list(range(len(dm.train_dataset))), batch_size=3, shuffle=True,
                       generator=torch.Generator().manual_seed(4))
    sampler = dm.train_dataloader().sampler
    for epoch in range(4):  # whole epochs, as training reads them (epochs after the first differed)
        sampler.set_epoch(epoch)
        assert list(sampler) == [int(i) for batch in plain for i in batch]

    steps = -(-len(dm.train_dataset) // 2)  # batches per epoch

    def fit(ckpt_path=None, callbacks=()):
        module = _recorder()
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=bool(callbacks),
                            callbacks=list(callbacks), default_root_dir=tmp_path)
        trainer.fit(module, datamodule=InstructionDataModule(chat_tok, RECORDS, batch_size=2, seed=4),
                    ckpt_path=ckpt_path)
        return module.seen

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=steps, save_top_k=-1)
    whole = fit(callbacks=[ckpt])
    resumed = fit(ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={steps}.ckpt")
    assert [s for s in whole if s[0] == 1] == resumed and resumed
    assert [b for e, b in whole if e == 0] != [b for e, b in whole if e == 1]


@pytest.mark.parametrize("case", ["plain", "accumulate", "val_check", "limit", "workers", "estimated",
                                  "estimated_workers"])
def test_a_run_resumed_mid_epoch_trains_the_batches_the_uninterrupted_run_does(case, chat_tok, tmp_path):
    """The training loader is resumable: a run resumed from a checkpoint in the middle of an
    epoch (or at its end) trains exactly the remaining batches of the uninterrupted run, in its
    order, and Lightning does not warn that the loader is not resumable. (A plain loader restarted
    the epoch: it trained the epoch's first batches again and never the last ones; with workers,
    a run resumed at an epoch's end replayed epoch 0's order.) Checkpoints from steps, from
    mid-epoch validation, with gradient accumulation, limit_train_batches and a worker process,
    and with a ``configure_optimizers`` that reads ``trainer.estimated_stepping_batches`` (the
    loader is then built before the checkpoint is restored, and Lightning does not hand it its
    state: the data module's own state carries it)."""
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer_kw = {"accumulate": dict(accumulate_grad_batches=2), "val_check": dict(val_check_interval=2),
                  "limit": dict(limit_train_batches=3)}.get(case, {})
    every = {"val_check": {}, "workers": dict(every_n_train_steps=4),
             "estimated_workers": dict(every_n_train_steps=4),
             "limit": dict(every_n_train_steps=2)}.get(case, dict(every_n_train_steps=3))
    workers, val = (1 if case.endswith("workers") else 0), case == "val_check"

    def fit(ckpt_path=None, callbacks=()):
        module = _recorder(estimate=case.startswith("estimated"))
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=bool(callbacks),
                            callbacks=list(callbacks), default_root_dir=tmp_path, num_sanity_val_steps=0,
                            **trainer_kw)
        dm = InstructionDataModule(chat_tok, RECORDS, batch_size=1, seed=4, num_workers=workers,
                                   val_fraction=0.25 if val else 0.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        assert not [w for w in caught if "not resumable" in str(w.message)]
        return [tuple(map(tuple, ids)) for _, ids in module.seen], trainer.global_step

    whole, total = fit(callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **every)])
    per_epoch = len(whole) // 2
    assert len(set(whole[:per_epoch])) == per_epoch  # each batch is recognisable
    assert whole[:per_epoch] != whole[per_epoch:]
    paths = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    steps = {int(p.stem.split("step=")[1]) for p in paths}
    per_step = 2 if case == "accumulate" else 1
    assert any(s * per_step % per_epoch for s in steps) and len(steps) >= 2  # mid-epoch ones
    for path in paths:
        step = int(path.stem.split("step=")[1])
        resumed, end = fit(ckpt_path=path)
        assert end == total
        assert resumed == whole[len(whole) - len(resumed):], path.name
        assert len(resumed) == len(whole) - min(step * per_step, len(whole)), path.name


def test_a_run_stopped_by_an_exception_resumes_where_it_stopped(chat_tok, tmp_path):
    """``OnExceptionCheckpoint`` writes a checkpoint when a step raises (batch 11 of 16 here, in
    the second epoch): the resumed run trains the failed batch and the rest, and the two parts
    together are the uninterrupted run's batches."""
    import lightning as L
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    def fit(ckpt_path=None, fail_at=None):
        module = _recorder(estimate=True)
        step = module.training_step

        def failing(batch, batch_idx):
            if len(module.seen) == fail_at:
                raise RuntimeError("stopped")
            return step(batch, batch_idx)

        module.training_step = failing
        callbacks = [OnExceptionCheckpoint(tmp_path)] if fail_at is not None else []
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=bool(callbacks),
                            callbacks=callbacks, default_root_dir=tmp_path)
        dm = InstructionDataModule(chat_tok, RECORDS, batch_size=1, seed=4)
        if fail_at is None:
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        else:
            with pytest.raises(RuntimeError, match="stopped"):
                trainer.fit(module, datamodule=dm)
        return module.seen

    whole = fit()
    first = fit(fail_at=11)
    rest = fit(ckpt_path=tmp_path / "on_exception.ckpt")
    assert len(first) == 11 and first + rest == whole


def test_resumable_loader_state_is_checked(chat_tok):
    from lightning_peft.data import ResumableLoader

    loader = InstructionDataModule(chat_tok, RECORDS, batch_size=3).train_dataloader()
    assert isinstance(loader, ResumableLoader) and loader.state_dict() == {}  # outside a fit
    loader.load_state_dict({})
    assert len(list(loader)) == 3
    for bad in ({"epoch": 0, "batches": 1}, {"epoch": -1, "batches": 1, "finished": False},
                {"epoch": 0, "batches": 1.5, "finished": False}, {"epoch": 0, "batches": 1, "finished": 1}):
        with pytest.raises(ValueError, match="training loader's checkpoint state must be"):
            loader.load_state_dict(bad)
    loader.load_state_dict({"epoch": 0, "batches": 2, "finished": False})
    first = [b["input_ids"].shape[0] for b in loader]
    assert first == [2]  # the last batch of 8 records in threes: two batches skipped
    assert [b["input_ids"].shape[0] for b in loader] == [3, 3, 2]  # then whole epochs


def test_fit_with_lightning_trainer(chat_tok):
    import lightning as L
    from transformers import LlamaConfig, LlamaForCausalLM

    class _Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            config = LlamaConfig(vocab_size=len(chat_tok), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2)
            self.model = LlamaForCausalLM(config)
            self.val_losses = []

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def validation_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.val_losses.append(loss.item())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = _Module()
    dm = InstructionDataModule(chat_tok, RECORDS, val_fraction=0.25, batch_size=3)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert module.val_losses and all(torch.isfinite(torch.tensor(module.val_losses)))


# --- lengths ---------------------------------------------------------------------------------


def test_truncation(chat_tok, tmp_path):
    record = RECORDS[0]
    full = encode_example(chat_tok, record)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    limit = n_prompt + 3
    cut = encode_example(chat_tok, record, max_length=limit, truncation=True)
    assert cut["input_ids"] == full["input_ids"][:limit]
    assert cut["labels"] == full["labels"][:limit]
    with pytest.raises(ValueError, match="prompt alone is"):
        encode_example(chat_tok, record, max_length=n_prompt, truncation=True)
    with pytest.raises(ValueError, match=r"record: example is \d+ tokens.*max_length="):
        encode_example(chat_tok, record, max_length=limit)

    path = _write_jsonl(tmp_path / "long.jsonl", [json.dumps(r) for r in RECORDS[1:3]]
                        + [json.dumps(record)])
    short = max(len(encode_example(chat_tok, r)["input_ids"]) for r in RECORDS[1:3])
    assert short < len(full["input_ids"])
    dm = InstructionDataModule(chat_tok, path, max_length=short)
    with pytest.raises(ValueError, match=rf"long\.jsonl line 3: example is .*max_length={short}"):
        dm.setup("fit")
    dm = InstructionDataModule(chat_tok, path, max_length=short, truncation=True)
    with pytest.warns(UserWarning, match=r"1 of 3 records are longer than max_length=\d+ and their "
                                         r"answers were cut \(without the closing EOS\), the first "
                                         r".*long\.jsonl line 3"):
        dm.setup("fit")  # (they were cut without a word)
    assert max(len(ex["input_ids"]) for ex in dm.train_dataset) == short
    dm = InstructionDataModule(chat_tok, RECORDS[:1], max_length=limit)
    with pytest.raises(ValueError, match=r"train\[0\]: example is"):
        dm.setup("fit")


# --- bad records -----------------------------------------------------------------------------


def test_load_records_from_file_and_list(tmp_path):
    lines = [json.dumps(r) for r in RECORDS[:3]]
    path = _write_jsonl(tmp_path / "ok.jsonl", [lines[0], "", "  ", lines[1], lines[2]])
    assert load_records(path) == [_full(r) for r in RECORDS[:3]]
    assert load_records(str(path)) == load_records(RECORDS[:3])
    array = tmp_path / "ok.json"
    array.write_text(json.dumps(RECORDS[:3], indent=2), encoding="utf-8")
    assert load_records(array) == [_full(r) for r in RECORDS[:3]]
    extra = dict(RECORDS[0], id=7, input=None)
    assert load_records([extra]) == [{**_full(RECORDS[0]), "input": ""}]
    # A raw line separator inside a JSON string does not end the line; CRLF files load.
    odd = {"instruction": "a\u2028b", "input": "", "output": "c\x85d"}
    path = _write_jsonl(tmp_path / "odd.jsonl", [json.dumps(odd, ensure_ascii=False) + "\r"])
    assert load_records(path) == [odd]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(RECORDS[0]).encode()[:-2] + b'\xe9"}\n')
    with pytest.raises(ValueError, match="latin.jsonl: not UTF-8"):
        load_records(latin)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"instruction": "x", "input": ""}', "line 2: missing field 'output'"),
        ('{"input": "a", "output": "b"}', "line 2: missing field 'instruction'"),
        ('{"instruction": "x", "input": "", "output": 3}', "line 2: field 'output' must be a str"),
        ('{"instruction": ["x"], "output": "y"}', "line 2: field 'instruction' must be a str"),
        ('{"instruction": "x", "input": 1.5, "output": "y"}', "line 2: field 'input' must be"),
        ('{"instruction": "x", "output": "y"', "line 2: invalid JSON"),
        ("not json at all", "line 2: invalid JSON"),
        ('["instruction", "output"]', "line 2: expected a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, chat_tok, line, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), line])
    with pytest.raises(ValueError, match="bad.jsonl " + _escape(message)):
        load_records(path)
    with pytest.raises(ValueError, match="bad.jsonl " + _escape(message)):
        InstructionDataModule(chat_tok, RECORDS, val=path)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_bad_list_record_names_index(chat_tok):
    bad = [RECORDS[0], {"instruction": "x", "output": None}]
    with pytest.raises(ValueError, match=r"train\[1\]: field 'output' must be a string"):
        InstructionDataModule(chat_tok, bad)
    with pytest.raises(ValueError, match=r"source\[1\]: field 'output'"):
        load_records(bad)
    with pytest.raises(ValueError, match="no such file"):
        load_records("/nonexistent/data.jsonl")
    with pytest.raises(ValueError, match="holds no records"):
        load_records([])
    with pytest.raises(ValueError, match="path to a JSONL/JSON file or a list"):
        load_records(42)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_workers": -1}, "num_workers must be a non-negative integer"),
        ({"max_length": 1}, "max_length must be an integer >= 2"),
        ({"seed": "x"}, "seed must be an integer"),
    ],
)
def test_bad_arguments(chat_tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        InstructionDataModule(chat_tok, RECORDS, **kwargs)


def test_shipped_task_files_are_valid():
    root = Path(__file__).resolve().parents[1] / "examples" / "data"
    train = load_records(root / "triples_train.jsonl")
    held = load_records(root / "triples_eval.jsonl")
    assert len(train) == 400 and len(held) == 100
    assert not {r["input"] for r in train} & {r["input"] for r in held}
    for r in train + held:
        assert r["output"].startswith("(") and r["output"].endswith(")")
        for triple in r["output"][1:-1].split("); ("):
            assert len(triple.split(" | ")) == 3, r["output"]


def test_files_from_windows_tools_load(chat_tok, tmp_path):
    """A UTF-8 byte-order mark (Notepad, PowerShell) and an upper-case ``.JSON`` suffix load (they
    used to be invalid JSON at line 1); an empty file is named by its path."""
    record = '{"instruction": "a", "output": "b"}'
    (tmp_path / "bom.jsonl").write_text("\ufeff" + record + "\r\n" + record + "\r\n", encoding="utf-8")
    (tmp_path / "LIST.JSON").write_text("\ufeff[" + record + "]", encoding="utf-8")
    assert load_records(tmp_path / "bom.jsonl") == [{"instruction": "a", "input": "", "output": "b"}] * 2
    assert load_records(tmp_path / "LIST.JSON") == [{"instruction": "a", "input": "", "output": "b"}]
    assert len(InstructionDataModule(chat_tok, str(tmp_path / "bom.jsonl")).train_records) >= 1
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"^'.*empty\.jsonl' holds no records$"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match=r"^train: '.*empty\.jsonl' holds no records$"):
        InstructionDataModule(chat_tok, str(tmp_path / "empty.jsonl"))
