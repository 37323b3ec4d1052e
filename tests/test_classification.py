"""Sequence classification: the data module's parsing and errors, the module's loss and accuracy,
a LoRA fit that trains only adapters and the head, and the shipped task's generator."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers
from torch.nn import functional as F

from lightning_peft import LoRACallback
from lightning_peft.data import (
    ClassificationDataModule,
    collate_classification,
    encode_classification_example,
    load_classification_records,
)
from lightning_peft.tasks import SequenceClassificationModule

DATA_DIR = Path(__file__).resolve().parents[1] / "examples" / "data"

RECORDS = [
    {"text": "Nadia sold a bike to Omar.", "text_pair": "Omar bought a bike from Nadia.", "label": 1},
    {"text": "Nadia sold a bike to Omar.", "text_pair": "Nadia bought a bike from Omar.", "label": 0},
    {"text": "Omar is taller than Nadia.", "text_pair": "Nadia is shorter than Omar.", "label": 1},
    {"text": "Omar is taller than Nadia.", "text_pair": "Omar is shorter than Nadia.", "label": 0},
    {"text": "Lena taught Omar chess.", "text_pair": "Omar learned chess from Lena.", "label": 1},
    {"text": "Lena taught Omar chess.", "text_pair": "Lena learned chess from Omar.", "label": 0},
    {"text": "Omar beat Lena at chess.", "text_pair": "Lena lost to Omar at chess.", "label": 1},
    {"text": "Omar beat Lena at chess.", "text_pair": "Omar lost to Lena at chess.", "label": 0},
]
TEXT_ONLY = [
    {"text": "the bike is great", "label": "pos"},
    {"text": "the bike is bad", "label": "neg"},
    {"text": "the bike is a bike", "label": "neutral"},
]
LABELS = ["neg", "neutral", "pos"]


@pytest.fixture(scope="module")
def tokenizer():
    """A BERT WordPiece tokenizer over the words of the test records (``[CLS] a [SEP] b [SEP]``)."""
    words = sorted({w for r in RECORDS + TEXT_ONLY for key in ("text", "text_pair")
                    for w in r.get(key, "").lower().replace(".", " . ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert tok.unk_token_id not in tok(RECORDS[0]["text"], RECORDS[0]["text_pair"])["input_ids"]
    return tok


def _bert(tokenizer, num_labels: int = 2, seed: int = 0) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48, max_position_embeddings=64,
                                  num_labels=num_labels, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


# --- records -----------------------------------------------------------------------------------

def test_load_records_pairs_and_single_texts(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in RECORDS[:2]] + [""]
                        + [json.dumps({"text": "x", "text_pair": None, "label": 0, "extra": 1})])
    records = load_classification_records(path)
    assert records[0] == {"text": RECORDS[0]["text"], "text_pair": RECORDS[0]["text_pair"], "label": 1}
    assert records[2] == {"text": "x", "text_pair": None, "label": 0}
    # string labels go through the label list; indices are accepted beside them
    named = load_classification_records(TEXT_ONLY + [{"text": "y", "label": 2}], labels=LABELS)
    assert [r["label"] for r in named] == [2, 0, 1, 2]
    assert all(r["text_pair"] is None for r in named)


@pytest.mark.parametrize("line, message", [
    ('{"text": "a", "label": 0', "invalid JSON"),
    ('["text", "a"]', "expected a JSON object"),
    ('{"label": 0}', "missing field 'text'"),
    ('{"text": "a"}', "missing field 'label'"),
    ('{"text": 3, "label": 0}', "field 'text' must be a string"),
    ('{"text": "a", "text_pair": ["b"], "label": 0}', "field 'text_pair' must be a string"),
    ('{"text": "a", "label": true}', "field 'label' must be an integer"),
    ('{"text": "a", "label": 1.0}', "field 'label' must be an integer"),
    ('{"text": "a", "label": -1}', "unknown label -1"),
    ('{"text": "a", "label": "pos"}', r"pass labels=\[...\]"),
])
def test_bad_record_names_file_and_line(tmp_path, line, message):
    path = _write_jsonl(tmp_path / "train.jsonl", [json.dumps(RECORDS[0]), "", line])
    with pytest.raises(ValueError, match=message) as err:
        load_classification_records(path)
    assert f"{path} line 3" in str(err.value)


def test_unknown_labels_name_the_line_and_the_valid_ones(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "t.jsonl", [json.dumps(TEXT_ONLY[0]), '{"text": "a", "label": "great"}'])
    with pytest.raises(ValueError, match=r"t.jsonl line 2: unknown label 'great'; the labels are "
                                         r"\['neg', 'neutral', 'pos'\]"):
        load_classification_records(path, labels=LABELS)
    path = _write_jsonl(tmp_path / "i.jsonl", ['{"text": "a", "label": 1}', '{"text": "a", "label": 3}'])
    with pytest.raises(ValueError, match=r"i.jsonl line 2: unknown label 3; a class index must be 0\.\.2"):
        load_classification_records(path, labels=LABELS)
    with pytest.raises(ValueError, match=r"i.jsonl line 2: unknown label 3; a class index must be 0\.\.1"):
        load_classification_records(path, num_labels=2)
    # the validation file is checked too, and named
    val = _write_jsonl(tmp_path / "val.jsonl",
                       ['{"text": "a", "label": "pos"}', '{"text": "b", "label": "so-so"}'])
    with pytest.raises(ValueError, match=r"val.jsonl line 2: unknown label 'so-so'"):
        ClassificationDataModule(tokenizer, TEXT_ONLY, val=val, labels=LABELS)


def test_list_sources_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match=r"source\[1\]: missing field 'label'"):
        load_classification_records([{"text": "a", "label": 0}, {"text": "b"}])
    with pytest.raises(ValueError, match="holds no records"):
        load_classification_records(_write_jsonl(tmp_path / "e.jsonl", ["", " "]))
    with pytest.raises(ValueError, match="no such file"):
        load_classification_records(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("kwargs, message", [
    ({"labels": ["a"]}, "at least two class names"),
    ({"labels": "ab"}, "at least two class names"),
    ({"labels": ["a", "a"]}, "must not repeat"),
    ({"labels": ["a", "b"], "num_labels": 3}, "disagrees"),
    ({"num_labels": 1}, "num_labels must be an integer >= 2"),
])
def test_bad_label_lists(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_classification_records(RECORDS, **kwargs)


# --- encoding, batches, data module ------------------------------------------------------------

def test_encode_pair_and_collate_pads_dynamically(tokenizer):
    pair = encode_classification_example(tokenizer, load_classification_records(RECORDS[:1])[0])
    single = encode_classification_example(tokenizer, {"text": "the bike", "text_pair": None, "label": 2})
    ids = tokenizer(RECORDS[0]["text"], RECORDS[0]["text_pair"])
    assert pair["input_ids"] == ids["input_ids"] and pair["token_type_ids"] == ids["token_type_ids"]
    assert pair["label"] == 1 and 1 in pair["token_type_ids"]
    assert single["input_ids"] == tokenizer("the bike")["input_ids"] and set(single["token_type_ids"]) == {0}
    batch = collate_classification([single, pair], pad_token_id=tokenizer.pad_token_id)
    width = len(pair["input_ids"])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (2, width)
    n = len(single["input_ids"])
    assert batch["input_ids"][0, n:].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [n, width]
    assert batch["token_type_ids"][1].tolist() == pair["token_type_ids"]
    assert batch["labels"].tolist() == [2, 1]
    # without token_type_ids (a GPT-style tokenizer) the key is left out
    no_types = collate_classification([{"input_ids": [5, 6], "label": 0}], pad_token_id=0)
    assert set(no_types) == {"input_ids", "attention_mask", "labels"}


def test_truncation_and_overlong_records(tmp_path, tokenizer):
    record = load_classification_records(RECORDS[:1])[0]
    full = len(tokenizer(record["text"], record["text_pair"])["input_ids"])
    cut = encode_classification_example(tokenizer, record, max_length=full - 3)
    assert len(cut["input_ids"]) == full - 3 and cut["input_ids"][-1] == tokenizer.sep_token_id
    short = [{"text": "the bike", "label": 0}, {"text": "the bike is bad", "label": 1}]
    path = _write_jsonl(tmp_path / "long.jsonl", [json.dumps(r) for r in short + RECORDS[:1]])
    with pytest.raises(ValueError, match=rf"long.jsonl line 3: example is {full} tokens, longer than "
                                         rf"max_length={full - 3}"):
        ClassificationDataModule(tokenizer, path, max_length=full - 3, truncation=False).setup()


def test_data_module_batches_split_and_num_labels(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in RECORDS])
    dm = ClassificationDataModule(tokenizer, path, val_fraction=0.25, batch_size=3, seed=1)
    assert dm.num_labels == 2 and dm.labels is None
    assert len(dm.train_records) == 6 and len(dm.val_records) == 2
    assert {r["text_pair"] for r in dm.train_records}.isdisjoint({r["text_pair"] for r in dm.val_records})
    batches = list(dm.train_dataloader())
    assert [b["labels"].shape[0] for b in batches] == [3, 3]
    for b in batches:  # padded to the longest record of its own batch
        assert b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]
    assert sum(b["labels"].shape[0] for b in dm.val_dataloader()) == 2
    named = ClassificationDataModule(tokenizer, TEXT_ONLY, labels=LABELS)
    assert named.num_labels == 3 and named.labels == LABELS and named.val_dataloader() == []
    assert ClassificationDataModule(tokenizer, [{"text": "a", "label": 4}]).num_labels == 5
    with pytest.raises(ValueError, match="give either val or val_fraction"):
        ClassificationDataModule(tokenizer, path, val=path, val_fraction=0.5)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ClassificationDataModule(tokenizer, path, batch_size=0)


# --- module ------------------------------------------------------------------------------------

def test_loss_is_cross_entropy_of_the_logits(tokenizer):
    model = _bert(tokenizer, num_labels=3)
    module = SequenceClassificationModule(model)
    assert module.num_labels == 3
    dm = ClassificationDataModule(tokenizer, TEXT_ONLY + RECORDS, labels=LABELS, batch_size=11)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    logits, labels, loss = module._logits_loss(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = F.cross_entropy(model(**inputs).logits, batch["labels"])
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert torch.equal(labels, batch["labels"]) and logits.shape == (11, 3)
    # the HF model's own loss agrees: nothing is added or left out
    torch.testing.assert_close(loss, model(**batch).loss, rtol=0, atol=1e-6)


def test_validation_accuracy_and_history(tokenizer):
    model = _bert(tokenizer, seed=3)
    dm = ClassificationDataModule(tokenizer, RECORDS, val=RECORDS[:5], batch_size=2)
    module = SequenceClassificationModule(model)
    metrics = _trainer().validate(module, dm, verbose=False)[0]
    dm.setup()
    with torch.no_grad():
        preds = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
                           for b in dm.val_dataloader()])
        losses = [F.cross_entropy(model(**b).logits, b["labels"], reduction="sum")
                  for b in dm.val_dataloader()]
    truth = torch.tensor([r["label"] for r in RECORDS[:5]])
    assert metrics["val_acc"] == pytest.approx((preds == truth).float().mean().item())
    assert metrics["val_loss"] == pytest.approx(float(sum(losses)) / 5, abs=1e-5)
    assert module.history["val_acc"] == [(0, pytest.approx(metrics["val_acc"]))]
    predicted = _trainer().predict(module, dm.val_dataloader())
    assert torch.equal(torch.cat(predicted), preds)


def test_module_argument_errors(tokenizer):
    with pytest.raises(ValueError, match="num_labels must be an integer >= 2"):
        SequenceClassificationModule(_bert(tokenizer), num_labels=1)
    with pytest.raises(ValueError, match="has no config.num_labels"):
        SequenceClassificationModule(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lr must be a finite positive number"):
        SequenceClassificationModule(_bert(tokenizer), lr=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        SequenceClassificationModule(_bert(tokenizer), schedule="step")
    module = SequenceClassificationModule(_bert(tokenizer, num_labels=2), num_labels=3)
    with pytest.raises(ValueError, match=r"logits of shape \(1, 2\); expected \(batch, num_labels=3\)"):
        module(input_ids=torch.tensor([[2, 5, 3]]))


def test_lora_fit_trains_only_adapters_and_head(tokenizer):
    model = _bert(tokenizer, seed=1)
    before = [(name, p, p.detach().clone()) for name, p in model.named_parameters()]
    dm = ClassificationDataModule(tokenizer, RECORDS, batch_size=4)
    module = SequenceClassificationModule(model, lr=1e-2, warmup_steps=0)
    lora = LoRACallback(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    _trainer(max_steps=3, callbacks=[lora]).fit(module, dm)
    assert module.global_step == 3 and len(module.history["train_loss"]) == 3
    for name, param, value in before:  # every original parameter, head included, is untouched
        assert torch.equal(param, value), name
    original = {id(p) for _, p, _ in before}
    new = {n: p for n, p in model.named_parameters() if id(p) not in original}
    assert new and all(p.requires_grad for p in new.values())
    assert all(("lora_" in n) or n.startswith("classifier.modules_to_save.") for n in new), sorted(new)
    assert {n.split(".")[-1] for n in new if "lora_" in n} >= {"lora_A", "lora_B"}
    assert sum("lora_" in n for n in new) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in new)
    # the adapters and the head copy moved away from their starting points
    assert all(p.abs().sum() > 0 for n, p in new.items() if n.endswith("lora_B"))
    head, copy = model.classifier.original_module, model.classifier.modules_to_save
    assert not torch.equal(head.weight, copy.weight)


# --- the shipped task ------------------------------------------------------------------------

def _generate(out_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DATA_DIR / "make_roles.py"), "--out-dir", str(out_dir), *args],
                          check=True, capture_output=True, text=True)


def test_roles_generator_is_deterministic_and_matches_the_shipped_files(tmp_path):
    for name in ("a", "b"):
        _generate(tmp_path / name)
    for split in ("train", "eval"):
        a = (tmp_path / "a" / f"roles_{split}.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"roles_{split}.jsonl").read_bytes()
        assert a == (DATA_DIR / f"roles_{split}.jsonl").read_bytes()
    _generate(tmp_path / "c", "--seed", "1")
    other = (tmp_path / "c" / "roles_train.jsonl").read_bytes()
    assert other != (tmp_path / "a" / "roles_train.jsonl").read_bytes()


def _words(sentence: str) -> list[str]:
    return sentence.replace(".", " ").replace(",", " ").replace("'s", " 's").split()


def _first_name(sentence: str, names: set[str]) -> str:
    return next(w for w in _words(sentence) if w in names)


def test_roles_task_label_is_name_order_not_words():
    sys.path.insert(0, str(DATA_DIR))
    try:
        import make_roles
    finally:
        sys.path.remove(str(DATA_DIR))
    names = set(make_roles.NAMES)
    train = load_classification_records(DATA_DIR / "roles_train.jsonl", num_labels=2)
    held = load_classification_records(DATA_DIR / "roles_eval.jsonl", num_labels=2)
    assert (len(train), len(held)) == (2000, 400)

    def people(records):
        return {w for r in records for w in _words(r["text"]) if w in names}

    assert people(train).isdisjoint(people(held))  # held-out people are new
    for records in (train, held):
        assert 0.45 < sum(r["label"] for r in records) / len(records) < 0.55
        for r in records:  # same two people; the label is whether they come in the same order
            assert sorted(w for w in _words(r["text"]) if w in names) == \
                sorted(w for w in _words(r["text_pair"]) if w in names)
            assert r["label"] == int(_first_name(r["text"], names) == _first_name(r["text_pair"], names))

    def bag(r):  # the words of a record, names masked, the pair's marked as such
        return ["NAME" if w in names else w.lower() for w in _words(r["text"])] + \
            ["pair:NAME" if w in names else "pair:" + w.lower() for w in _words(r["text_pair"])]

    # naive Bayes on bags of words learns nothing that carries over to the held-out set
    counts = [{}, {}]
    for r in train:
        for w in bag(r):
            counts[r["label"]][w] = counts[r["label"]].get(w, 0) + 1
    totals = [sum(c.values()) for c in counts]
    vocab = len(set(counts[0]) | set(counts[1]))

    def score(r, k):
        return sum(math.log((counts[k].get(w, 0) + 1) / (totals[k] + vocab)) for w in bag(r))

    accuracy = sum((score(r, 1) > score(r, 0)) == r["label"] for r in held) / len(held)
    assert 0.4 < accuracy < 0.6


def test_roles_generator_flipped_phrasings():
    sys.path.insert(0, str(DATA_DIR))
    try:
        import make_roles
    finally:
        sys.path.remove(str(DATA_DIR))
    names = set(make_roles.NAMES)
    train, _ = make_roles.make_roles(n_train=400, n_eval=10, flip_fraction=1.0)
    # every restatement names the roles in the opposite order: the label is the name order flipped
    assert all(r["label"] != int(_first_name(r["text"], names) == _first_name(r["text_pair"], names))
               for r in train)
    with pytest.raises(ValueError, match="flip_fraction"):
        make_roles.make_roles(flip_fraction=1.5)


def test_a_fresh_head_is_the_same_in_every_process_and_of_any_size(tokenizer, tmp_path):
    """A saved 2-class classifier loads with 3 classes (a fresh head: transformers refused the
    size), and the fresh head is drawn from ``head_seed`` whatever torch's random state (which is
    left as it was): an intrinsic-dimension adapter that projects the head reloads onto the head
    it trained from (it reloaded onto another random head: other predictions)."""
    from lightning_peft import apply_intrinsic, load_adapter, save_adapter
    from lightning_peft.tasks import load_sequence_classifier

    _bert(tokenizer).save_pretrained(tmp_path / "base")
    three = load_sequence_classifier(tmp_path / "base", 3)
    assert three.classifier.weight.shape[0] == 3
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = load_sequence_classifier(tmp_path / "base", 3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    again = load_sequence_classifier(tmp_path / "base", 3)
    assert torch.equal(again.classifier.weight, first.classifier.weight)

    model = apply_intrinsic(load_sequence_classifier(tmp_path / "base", 3), d=40, said=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    batch = tokenizer([r["text"] for r in RECORDS], [r["text_pair"] for r in RECORDS], padding=True,
                      return_tensors="pt")
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(3)
    reloaded = load_adapter(load_sequence_classifier(tmp_path / "base", 3), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained, rtol=0, atol=0)


def test_a_max_length_below_the_special_tokens_says_so(tokenizer):
    """With truncation on, the error told the user to set truncation=True."""
    with pytest.raises(ValueError, match=r"max_length=2 leaves no room .* 3 special tokens of a sentence"):
        encode_classification_example(tokenizer, RECORDS[0], max_length=2, truncation=True)
