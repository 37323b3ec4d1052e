"""The methods comparison harness (benchmarks/methods.py): the causal task on a tiny random Llama,
the classify task on a tiny random BERT classifier, a few rows each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from benchmarks import methods
from tests.test_example import save_tiny_model

PAIRS = [
    {"text": "Nadia sold a bike to Omar.", "text_pair": "Omar bought a bike from Nadia.", "label": 1},
    {"text": "Nadia sold a bike to Omar.", "text_pair": "Nadia bought a bike from Omar.", "label": 0},
    {"text": "Omar is taller than Nadia.", "text_pair": "Nadia is shorter than Omar.", "label": 1},
    {"text": "Omar is taller than Nadia.", "text_pair": "Omar is shorter than Nadia.", "label": 0},
    {"text": "Lena taught Omar chess.", "text_pair": "Omar learned chess from Lena.", "label": 1},
    {"text": "Lena taught Omar chess.", "text_pair": "Lena learned chess from Omar.", "label": 0},
]
HIDDEN, LAYERS, FFN, LABELS = 24, 2, 48, 2


def _save_tiny_bert(directory: Path) -> Path:
    """A tiny random BertForSequenceClassification and a WordPiece tokenizer over PAIRS' words,
    saved as a Hugging Face model directory."""
    words = sorted({w for r in PAIRS for k in ("text", "text_pair")
                    for w in r[k].lower().replace(".", " . ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=2, intermediate_size=FFN, max_position_embeddings=64,
                                     num_labels=LABELS)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def classify_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("classify")
    return {"model": str(_save_tiny_bert(root / "tiny_bert")),
            "train": str(_write_jsonl(root / "train.jsonl", PAIRS)),
            "eval": str(_write_jsonl(root / "eval.jsonl", PAIRS[:5]))}


def test_two_methods_give_table_json_and_chart(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "tiny_llama")
    out = tmp_path / "results"
    rows = methods.main(["--model", str(model_dir), "--methods", "full,lora_qv", "--steps", "3",
                         "--batch-size", "4", "--eval-limit", "3", "--max-new-tokens", "4",
                         "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert [r["key"] for r in rows] == ["full", "lora_qv"]
    full, lora = rows
    assert full["requires_grad_params"] == full["total_params"]  # every parameter trains ...
    # ... and the column counts the weights that moved: the embedding rows of tokens the 3 steps
    # never saw stay as they were (AdamW without weight decay)
    assert full["trainable_params"] == full["changed_own_params"] < full["total_params"]
    assert full["new_trainable_params"] == 0
    assert 0 < lora["trainable_params"] < full["trainable_params"]
    assert lora["trainable_params"] == 2 * (8 * (32 + 32) + 8 * (32 + 16))  # r=8 on q (32->32), v (32->16)
    assert lora["requires_grad_params"] == lora["new_trainable_params"] == lora["trainable_params"]
    assert lora["changed_own_params"] == 0  # the base stays bit-identical
    assert full["total_params"] == lora["total_params"] - lora["trainable_params"]
    assert "Trainable params: elements of the tensors a method adds" in (out / "methods.md").read_text()
    assert full["saved_file"] == "model.safetensors" and lora["saved_file"] == "adapter_model.safetensors"
    assert lora["saved_mib"] < full["saved_mib"]
    for row in rows:
        assert 0.0 <= row["exact_match"] <= 1.0 and row["eval_records"] == 3
        assert row["train_seconds"] > 0 and row["peak_rss_growth_mib"] >= 0
        assert row["memory_method"] == "VmHWM reset at fit start"

    for line in ("Full fine-tuning", "LoRA r=8 (q, v)", "Trainable params", "Peak RSS growth"):
        assert line in printed
    markdown = (out / "methods.md").read_text()
    assert "| Method | Trainable params |" in markdown
    assert f"| LoRA r=8 (q, v) | {lora['trainable_params']:,} |" in markdown
    saved = json.loads((out / "methods.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["steps"] == 3
    assert (out / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --update: run only the QLoRA row; the earlier rows stay, in table order, with their command
    common = ["--model", str(model_dir), "--steps", "3", "--batch-size", "4", "--eval-limit", "3",
              "--max-new-tokens", "4", "--threads", "1", "--out", str(out)]
    with pytest.raises(SystemExit, match="other settings.*steps: 3 there, 4 now"):
        methods.main([*common[:2], "--steps", "4", *common[4:], "--methods", "qlora_all", "--update"])
    updated = methods.main([*common, "--methods", "qlora_all", "--update"])
    assert [r["key"] for r in updated] == ["full", "lora_qv", "qlora_all"]
    assert updated[:2] == rows
    qlora = updated[2]
    # r=8 on q, o (32->32), k, v (32->16), gate, up (32->64) and down (64->32), in 2 layers
    assert qlora["trainable_params"] == 2 * 8 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    assert qlora["total_params"] == full["total_params"] + qlora["trainable_params"]
    assert qlora["saved_file"] == "adapter_model.safetensors"
    markdown = (out / "methods.md").read_text()
    assert "| QLoRA r=8 (all linear, NF4) |" in markdown and "| LoRA r=8 (q, v) |" in markdown
    assert "--methods full,lora_qv" in markdown and "--methods qlora_all --update" in markdown
    assert json.loads((out / "methods.json").read_text())["rows"] == updated


def test_every_method_has_a_unique_key_and_builds_its_callbacks():
    keys = [m.key for m in methods.METHODS]
    assert len(keys) == len(set(keys)) and {"full", "lora_qv", "lora_all", "rslora_qv"} <= set(keys)
    assert methods.METHODS[0].callbacks() == []
    (rslora,) = next(m for m in methods.METHODS if m.key == "rslora_qv").callbacks()
    assert rslora.config.use_rslora and rslora.config.r == 64
    (qlora,) = next(m for m in methods.METHODS if m.key == "qlora_all").callbacks()
    assert type(qlora).__name__ == "QLoRACallback" and qlora.config.compute_dtype == "float32"


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "lora_qv,dora"], "--methods: unknown ['dora']"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--model", "/no/such/model"], "--model: no such file or directory"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        methods.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# --- --task classify ---------------------------------------------------------------------------


def _base_counts(model_dir: str) -> tuple[int, int]:
    """(every parameter, every bias outside the head) of the saved tiny BERT."""
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir)
    biases = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith(".bias") and not n.startswith("classifier."))
    return sum(p.numel() for p in model.parameters()), biases


def test_classify_rows_give_table_json_and_chart(tmp_path, capsys, classify_files):
    out = tmp_path / "results"
    common = ["--task", "classify", "--model", classify_files["model"], "--train", classify_files["train"],
              "--eval", classify_files["eval"], "--steps", "2", "--batch-size", "3", "--warmup", "1",
              "--threads", "1", "--out", str(out)]
    rows = methods.main([*common, "--methods", "lora_qv,head,bitfit"])
    printed = capsys.readouterr().out
    assert [r["key"] for r in rows] == ["head", "bitfit", "lora_qv"]  # table order, not command order
    head, bitfit, lora = rows
    total, biases = _base_counts(classify_files["model"])
    head_params = HIDDEN * LABELS + LABELS
    assert head["trainable_params"] == head_params and head["total_params"] == total
    # BitFit: every bias (LayerNorm's included) + a trainable copy of the head
    assert bitfit["trainable_params"] == biases + head_params
    assert bitfit["total_params"] == total + head_params
    # LoRA r=8 on query and value (24 -> 24) in 2 layers, + the head copy
    assert lora["trainable_params"] == LAYERS * 2 * 8 * (HIDDEN + HIDDEN) + head_params
    assert lora["total_params"] == total + lora["trainable_params"]
    assert [r["saved_file"] for r in rows] == ["head.safetensors", "adapter_model.safetensors",
                                               "adapter_model.safetensors"]
    assert head["saved_bytes"] < lora["saved_bytes"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["eval_records"] == 5
        assert "exact_match" not in row and "sample" not in row
        assert row["train_seconds"] >= 0 and row["peak_rss_growth_mib"] >= 0  # a tiny model: ~0.0 s
        assert row["memory_method"] == "VmHWM reset at fit start"
        assert row["hparams"] == next(m for m in methods.CLASSIFY_METHODS if m.key == row["key"]).hparams

    for line in ("Head only (frozen encoder)", "BitFit (all biases + head)", "Accuracy"):
        assert line in printed
    assert sorted(p.name for p in out.iterdir()) == ["methods_classify.json", "methods_classify.md",
                                                     "methods_classify.png"]
    markdown = (out / "methods_classify.md").read_text()
    assert "roles task" in markdown and "| Method | Trainable params | Trainable % | Accuracy |" in markdown
    assert f"| LoRA r=8 (query, value) | {lora['trainable_params']:,} |" in markdown
    assert f"| {head['accuracy']:.1%} |" in markdown
    saved = json.loads((out / "methods_classify.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["task"] == "classify"
    assert saved["settings"]["steps"] == 2 and saved["settings"]["eval_limit"] is None
    assert (out / "methods_classify.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --update adds IA3 (PEFT's BERT defaults: key, value, output.dense) and keeps the other rows
    with pytest.raises(SystemExit, match="other settings.*batch_size: 3 there, 2 now"):
        methods.main([*common, "--batch-size", "2", "--methods", "ia3", "--update"])
    updated = methods.main([*common, "--methods", "ia3", "--update"])
    assert [r["key"] for r in updated] == ["head", "bitfit", "lora_qv", "ia3"] and updated[:3] == rows
    # output scaling on key, value (24) and attention.output.dense (input 24, as PEFT's suffix match
    # makes it feed-forward), input scaling on output.dense (48), in 2 layers, + the head copy
    assert updated[3]["trainable_params"] == LAYERS * (HIDDEN + HIDDEN + HIDDEN + FFN) + head_params
    assert "| IA3 (key, value, ffn) |" in (out / "methods_classify.md").read_text()


def test_full_fine_tuning_row_of_classify_trains_everything(tmp_path, classify_files):
    (row,) = methods.main(["--task", "classify", "--model", classify_files["model"], "--train",
                           classify_files["train"], "--eval", classify_files["eval"], "--eval-limit", "3",
                           "--steps", "2", "--batch-size", "3", "--threads", "1", "--methods", "full",
                           "--out", str(tmp_path)])
    assert row["requires_grad_params"] == row["total_params"] == _base_counts(classify_files["model"])[0]
    # the weights that moved: not the embedding rows of words and positions the data never has
    assert 0 < row["trainable_params"] == row["changed_own_params"] < row["total_params"]
    assert row["saved_file"] == "model.safetensors" and row["eval_records"] == 3


def test_head_only_freezes_all_but_the_head_and_saves_it(tmp_path, classify_files):
    import lightning as L

    from lightning_peft import SequenceClassificationModule

    model = transformers.BertForSequenceClassification.from_pretrained(classify_files["model"])
    spec = next(m for m in methods.CLASSIFY_METHODS if m.key == "head")
    (callback,) = spec.callbacks()
    callback.setup(L.Trainer(accelerator="cpu", logger=False), SequenceClassificationModule(model), "fit")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight",
                                                                           "classifier.bias"}
    path = spec.save(model, tmp_path / "head")
    from safetensors.torch import load_file

    tensors = load_file(path)
    assert path.name == "head.safetensors" and set(tensors) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(tensors["classifier.weight"], model.classifier.weight)
    # a model without that head, or with two, is refused
    with pytest.raises(ValueError, match="exactly one module named 'classifier', found \\[\\]"):
        callback.setup(None, SequenceClassificationModule(torch.nn.Linear(2, 2), num_labels=2), "fit")


def test_classify_rows_are_registry_rows_except_full_and_head():
    keys = [m.key for m in methods.CLASSIFY_METHODS]
    assert keys[:5] == ["full", "head", "bitfit", "lora_qv", "ia3"]
    assert {"dora_qv", "adalora_qv", "relora_qv", "dylora_qv", "dylora_qv_r4", "dylora_qv_r2"} <= set(keys)
    truncated = [m for m in methods.CLASSIFY_METHODS if m.hparams.get("truncate_to")]
    assert sorted(m.hparams["truncate_to"] for m in truncated) == [2, 4]
    for spec in methods.CLASSIFY_METHODS[2:]:
        (callback,) = spec.callbacks()
        assert callback.method == spec.hparams["method"]
        if spec.hparams["method"] == "intrinsic_dimension":  # the head trains through the subspace
            assert callback.config.trainable_modules is None
            continue
        saved = getattr(callback.config, "modules_to_save", None) or callback.config.trainable_modules
        assert saved == ["classifier"]
    assert methods.TASKS["causal"].methods is methods.METHODS and methods.TASKS["causal"].stem == "methods"


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "glue"], "argument --task: invalid choice: 'glue'"),
    (["--task", "classify", "--methods", "lora_all"],
     "--methods: unknown ['lora_all'] for --task classify ('lora_all' is a row of --task causal)"),
    (["--task", "classify", "--methods", "head,qlora_all,dora"], "unknown ['qlora_all', 'dora']"),
    (["--methods", "head"], "unknown ['head'] for --task causal ('head' is a row of --task classify)"),
    (["--task", "classify", "--eval", "examples/data/triples_eval.jsonl"], "--eval: examples/data/"),
    (["--task", "classify", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--task", "classify", "--model", "examples/data"], "--model: 'examples/data' is not a Hugging Face"),
])
def test_bad_classify_arguments_are_refused(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(methods.ROOT)
    with pytest.raises(SystemExit) as info:
        methods.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_classify_defaults(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model directory: the defaults hold for any model
    model = ["--model", str(tmp_path)]
    args = methods.parse_args(["--task", "classify", "--threads", "1", *model])
    assert (args.steps, args.batch_size, args.warmup, args.eval_limit) == (300, 32, 30, None)
    assert Path(args.train).name == "roles_train.jsonl" and Path(args.eval).name == "roles_eval.jsonl"
    assert args.methods == [m.key for m in methods.CLASSIFY_METHODS]  # every row of the task by default
    causal = methods.parse_args(["--threads", "1", *model])  # the causal task's defaults are unchanged
    assert (causal.task, causal.steps, causal.batch_size, causal.warmup, causal.eval_limit) == \
        ("causal", 60, 4, 4, 100)
    assert Path(causal.train).name == "triples_train.jsonl"
    assert causal.methods == [m.key for m in methods.METHODS]


def test_issue_12_rows_in_both_tables():
    """Adapters (Houlsby, Pfeiffer, parallel), Child-tuning F and D and FishMask are rows of both
    tasks; on classify each trains the head in full."""
    new = ["adapter_houlsby", "adapter_pfeiffer", "adapter_parallel", "child_tuning_f", "child_tuning_d",
           "fishmask"]
    for table in (methods.METHODS, methods.CLASSIFY_METHODS):
        specs = {m.key: m for m in table}
        assert set(new) <= set(specs)
        for key in new:
            (callback,) = specs[key].callbacks()
            assert callback.method == specs[key].hparams["method"]
            expected = ["classifier"] if table is methods.CLASSIFY_METHODS else None
            assert callback.config.trainable_modules == expected
        configs = {k: specs[k].callbacks()[0].config for k in new}
        houlsby, pfeiffer, parallel = (configs[f"adapter_{k}"] for k in ("houlsby", "pfeiffer", "parallel"))
        assert (houlsby.config, houlsby.placement) == ("houlsby", "serial")
        assert (pfeiffer.config, pfeiffer.placement) == ("pfeiffer", "serial")
        assert (parallel.config, parallel.placement, parallel.scaling) == ("pfeiffer", "parallel", 4.0)
        assert [configs[k].mode for k in ("child_tuning_f", "child_tuning_d")] == ["F", "D"]
        assert configs["child_tuning_f"].p == configs["child_tuning_d"].p == 0.3
        assert configs["fishmask"].keep == 0.005



def test_issue_13_soft_prompt_rows():
    """Prompt tuning, P-tuning, prefix tuning, P-tuning v2 (default and zero start), LLaMA-Adapter
    and a single-task MPT are causal rows with n=20 (adapter_len 10 on every one of SmolLM2's 30
    layers); on classify only the prefix methods, which train the head as a copy
    (``modules_to_save``)."""
    causal = {m.key: m for m in methods.METHODS}
    configs = {k: causal[k].callbacks()[0].config for k in
               ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "llama_adapter", "mpt_single")}
    assert [causal[k].hparams["method"] for k in configs] == [
        "prompt_tuning", "p_tuning", "prefix_tuning", "prefix_tuning", "llama_adapter",
        "multitask_prompt_tuning"]
    assert all(c.num_virtual_tokens == 20 for k, c in configs.items() if k != "llama_adapter")
    assert configs["prompt_tuning"].init == "sample_vocab" and configs["p_tuning"].encoder_type == "MLP"
    assert configs["prefix_tuning"].prefix_projection and not configs["p_tuning_v2"].prefix_projection
    assert configs["p_tuning_v2"].init_weights is None  # HF PEFT's default start, and a zero start:
    (zero,) = causal["p_tuning_v2_zero"].callbacks()
    assert (zero.config.prefix_projection, zero.config.init_weights) == (False, "zero")
    assert (configs["llama_adapter"].adapter_len, configs["llama_adapter"].adapter_layers) == (10, 30)
    assert configs["mpt_single"].num_tasks == 1
    classify = {m.key: m for m in methods.CLASSIFY_METHODS}
    assert not {"llama_adapter", "mpt_single"} & set(classify)
    for key in ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "p_tuning_v2_zero"):
        (callback,) = classify[key].callbacks()
        assert callback.config.modules_to_save == ["classifier"]  # the fresh head trains
        assert classify[key].lr == causal[key].lr
        if key.startswith(("prefix", "p_tuning_v2")):
            assert callback.config.prefix_projection == (key == "prefix_tuning")
            assert callback.config.init_weights == ("zero" if key.endswith("_zero") else None)

def test_trainable_count_is_new_tensors_plus_own_weights_that_moved(tmp_path):
    """_changed_counts: every element of a parameter added since the snapshot that requires grad, and
    the entries of the model's own parameters that differ from the snapshot; an own parameter the
    method removed (QLoRA's fp32 base) counts nothing, and no name or method is looked at."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    own = methods._snapshot_own(model, tmp_path / "own.pt")
    with torch.no_grad():
        model[0].weight[0, :2] += 1.0  # 2 entries of an own weight move (a masked update)
        model[0].bias.copy_(model[0].bias)  # written, but to the same values: not counted
    model[1].register_parameter("bias", None)  # an own parameter gone (replaced by the method)
    model[1].extra = torch.nn.Parameter(torch.zeros(5))  # a new trainable tensor
    model[1].frozen = torch.nn.Parameter(torch.zeros(7), requires_grad=False)  # new, frozen: not counted
    assert methods._changed_counts(model, own, tmp_path / "own.pt") == (5, 2)


def test_adapter_fusion_row_trains_its_source_adapters_first(tmp_path):
    """The AdapterFusion row first trains one Pfeiffer adapter per relation family of the training
    data (as the adapter_pfeiffer row trains, on that family's records), then the fusion over them:
    only the fusion's Q, K, V count as trained, the saved fusion holds the trained source adapters
    bit for bit, and the JSON records the sources."""
    from safetensors.torch import load_file

    model_dir = save_tiny_model(tmp_path / "tiny_llama")
    result, scratch = tmp_path / "row.json", tmp_path / "scratch"
    assert methods.main(["--model", str(model_dir), "--steps", "2", "--batch-size", "4", "--eval-limit", "2",
                         "--max-new-tokens", "4", "--threads", "1", "--worker", "adapter_fusion",
                         "--result", str(result), "--scratch", str(scratch)]) == []
    row = json.loads(result.read_text())
    sources = row["sources"]
    assert sources["row"] == "adapter_pfeiffer" and row["hparams"]["sources"]["lr"] == 1e-3
    # the shipped triples data: records whose relations all lie in one family
    assert {k: v["records"] for k, v in sources["adapters"].items()} == {"personal": 144, "work": 112,
                                                                         "company": 96}
    # the fusion at the tiny Llama's 2 FFN sites: Q and K with biases, V, each 32x32
    assert row["trainable_params"] == row["new_trainable_params"] == 2 * (3 * 32 * 32 + 2 * 32)
    assert row["changed_own_params"] == 0 and row["saved_file"] == "adapter_model.safetensors"
    fused = load_file(scratch / "adapter_fusion" / "adapter_model.safetensors")
    stacked = {"adapter_down.weight": "adapters_down", "adapter_down.bias": "adapters_down_bias",
               "adapter_up.weight": "adapters_up", "adapter_up.bias": "adapters_up_bias"}
    for i, name in enumerate(sources["adapters"]):  # stacked in the order of the adapter directories
        source = load_file(scratch / "sources" / name / "adapter_model.safetensors")
        assert len(source) == 2 * 4
        for key, value in source.items():
            site, leaf = key.rsplit(".", 2)[0], ".".join(key.rsplit(".", 2)[1:])
            assert torch.equal(fused[f"{site}.{stacked[leaf]}"][i], value)
            if leaf == "adapter_up.weight":
                assert value.abs().sum() > 0  # trained: W_up starts at zero


def test_source_slices_need_the_relation_families():
    slices = methods._relation_families([{"output": "(A | founded | B)"}, {"output": "(C | born in | D)"},
                                         {"output": "(C | works for | E)"}])
    assert {k: len(v) for k, v in slices.items()} == {"personal": 1, "work": 1, "company": 1}
    with pytest.raises(ValueError, match=r"no record of the relation families \['personal', 'work'\]"):
        methods._relation_families([{"output": "(A | founded | B)"}])
    with pytest.raises(ValueError, match="need the triples data's records"):
        methods._relation_families([{"output": "positive"}])
