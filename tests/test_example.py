"""Smoke run of examples/finetune_lora.py on a tiny random Llama saved to a local directory."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random LlamaForCausalLM and a BPE tokenizer trained on the task's records.

    The directory loads with ``AutoModelForCausalLM/AutoTokenizer.from_pretrained`` like any
    Hugging Face model directory (no network).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    records = [json.loads(line) for line in (DATA / "triples_train.jsonl").read_text().splitlines()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|im_end|>", "<|im_start|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([f"{r['instruction']} {r['input']} {r['output']}" for r in records],
                                trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _example():
    return _load("finetune_lora")


def _lightning_log() -> tuple[list[str], logging.Handler]:
    """Collect the messages of Lightning's logger (where callbacks' ``rank_zero_info`` goes,
    whether or not Lightning gave that logger its own stderr handler)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.INFO)
    logging.getLogger("lightning.pytorch").addHandler(handler)
    return lines, handler


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """One small run of examples/finetune_lora.py: (out dir, results, stdout, Lightning's log)."""
    out = tmp_path_factory.mktemp("run")
    lines, handler = _lightning_log()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            results = _example().main(["--model", str(tiny_model_dir), "--steps", "6", "--batch-size", "4",
                                       "--eval-limit", "4", "--val-every", "3", "--max-new-tokens", "4",
                                       "--r", "4", "--targets", "q_proj,v_proj", "--threads", "1",
                                       "--out", str(out)])
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    return out, results, stdout.getvalue(), lines


def test_example_runs_and_writes_adapter_plot_and_numbers(lora_run):
    out, results, printed, _ = lora_run
    assert "Exact match before" in printed and "after" in printed

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert len(tensors) == 8 and all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained

    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "finetune_lora.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["eval_records"] == 4
    for key in ("exact_match_before", "exact_match_after"):
        assert 0.0 <= saved[key] <= 1.0
    assert 0 < saved["trainable_params"] < saved["total_params"]
    assert saved["trainable_params"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))  # 2 layers; q 32->32, v 32->16
    assert len(saved["val_loss"]) == 2  # validation after steps 3 and 6


def test_example_states_the_trainable_parameters_once(lora_run):
    _, results, printed, log = lora_run
    said = [line for line in [*printed.splitlines(), *log] if "trainable params" in line.lower()]
    assert len(said) == 1, said
    assert f"trainable params: {results['trainable_params']:,}" in said[0]


def test_example_progress_bar_counts_optimizer_steps(lora_run):
    _, _, printed, _ = lora_run
    assert "Epoch" not in printed and "/-2" not in printed
    assert "Training steps" in printed and "6/6" in printed


# Options whose value is wrong on its own, for both examples: (argv, text naming the option).
BAD_ARGUMENTS = [
    (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"), (["--steps", "1.5"], "--steps"),
    (["--batch-size", "0"], "--batch-size"), (["--r", "0"], "--r"), (["--r", "-4"], "--r"),
    (["--lr", "0"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--alpha", "0"], "--alpha"), (["--alpha", "nan"], "--alpha"), (["--alpha", "-16"], "--alpha"),
    (["--dropout", "1.5"], "--dropout"), (["--dropout", "1"], "--dropout"),
    (["--dropout", "-0.1"], "--dropout"), (["--dropout", "nan"], "--dropout"),
    (["--warmup", "-1"], "--warmup"), (["--eval-limit", "0"], "--eval-limit"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--threads", "0"], "--threads"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"),
    (["--train", "/no/such.jsonl"], "--train: no such file"), (["--eval", "/no/such.jsonl"], "--eval"),
    (["--model", "/no/such/model"], "--model: no such file or directory"),
    (["--targets", "q_proj,,v_proj"], "--targets"), (["--targets", ""], "--targets"),
]


def _refuse_to_load(example, monkeypatch) -> None:
    """Make loading a model (or starting a child process that would) fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although an argument is invalid")

    monkeypatch.setattr(example, "load_causal_lm", refuse)
    if hasattr(example, "subprocess"):
        monkeypatch.setattr(example.subprocess, "run", refuse)


def _fails_fast(example, argv: list[str], option: str, monkeypatch, capsys) -> str:
    _refuse_to_load(example, monkeypatch)
    with pytest.raises(SystemExit) as info:
        example.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and option in err, err
    return err


@pytest.mark.parametrize("name", ["finetune_lora", "finetune_qlora"])
@pytest.mark.parametrize(("argv", "option"), BAD_ARGUMENTS)
def test_example_rejects_a_bad_argument_before_loading_the_model(name, argv, option, monkeypatch, capsys):
    _fails_fast(_load(name), argv, option, monkeypatch, capsys)


@pytest.mark.parametrize("name", ["finetune_lora", "finetune_qlora"])
def test_example_rejects_bad_files_and_outputs_before_loading_the_model(name, tmp_path, monkeypatch, capsys):
    example = _load(name)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": oops}\n')
    err = _fails_fast(example, ["--train", str(bad)], "--train", monkeypatch, capsys)
    assert "line 2: invalid JSON" in err
    _fails_fast(example, ["--eval", str(tmp_path)], "--eval", monkeypatch, capsys)  # a directory
    err = _fails_fast(example, ["--model", str(tmp_path)], "--model", monkeypatch, capsys)
    assert "config.json" in err
    (tmp_path / "file").write_text("")
    err = _fails_fast(example, ["--out", str(tmp_path / "file")], "--out", monkeypatch, capsys)
    assert "not a directory" in err


@pytest.mark.parametrize(("argv", "option"), [
    (["--blocksize", "48"], "--blocksize"), (["--blocksize", "0"], "--blocksize"),
    (["--methods", "qlora,dora"], "--methods"), (["--methods", "lora,lora"], "--methods"),
    (["--methods", ","], "--methods"), (["--compute-dtype", "int8"], "--compute-dtype"),
])
def test_qlora_example_rejects_its_own_bad_arguments_before_loading(argv, option, monkeypatch, capsys):
    _fails_fast(_load("finetune_qlora"), argv, option, monkeypatch, capsys)


def test_lora_example_rejects_unknown_targets_after_loading_before_scoring(tiny_model_dir, tmp_path,
                                                                           monkeypatch, capsys):
    example = _example()

    def refuse(*args, **kwargs):
        raise AssertionError("scored although --targets matches nothing")

    monkeypatch.setattr(example, "generate_answers", refuse)
    with pytest.raises(SystemExit) as info:
        example.main(["--model", str(tiny_model_dir), "--targets", "nonexistent", "--threads", "1",
                      "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--targets" in err and "nonexistent" in err
    assert "q_proj" in err and "down_proj" in err  # the message lists the layers that exist


def test_qlora_example_rejects_unknown_targets_after_loading_before_training(tiny_model_dir, tmp_path,
                                                                             monkeypatch, capsys):
    example = _load("finetune_qlora")
    args = example.parse_args(["--model", str(tiny_model_dir), "--targets", "q_proj,nonexistent",
                               "--threads", "1", "--out", str(tmp_path / "out")])

    def refuse(*args, **kwargs):
        raise AssertionError("trained although --targets names a module that does not exist")

    monkeypatch.setattr(example, "CausalLMModule", refuse)
    with pytest.raises(SystemExit) as info:
        example.run_one(args, "qlora")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--targets" in err and "nonexistent" in err and "v_proj" in err


def test_qlora_example_exits_with_a_failed_child_status_without_a_traceback(monkeypatch, tmp_path, capsys):
    example = _load("finetune_qlora")
    calls = []

    def child(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 2)

    monkeypatch.setattr(example.subprocess, "run", child)
    with pytest.raises(SystemExit) as info:
        example.main(["--methods", "qlora,lora", "--out", str(tmp_path / "out"),
                      "--model", str(save_tiny_model(tmp_path / "tiny"))])
    assert info.value.code == 2 and len(calls) == 1  # the second method does not start
    assert "qlora" in capsys.readouterr().err
    assert not (tmp_path / "out" / "finetune_qlora.json").exists()


@pytest.mark.parametrize("name", ["finetune_lora", "finetune_qlora"])
def test_example_help_states_each_default_once(name, capsys):
    with pytest.raises(SystemExit) as info:
        _load(name).main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert len(entries) > 10
    for entry in entries:
        assert entry.count("(default") <= 1, entry
    steps = next(e for e in entries if e.startswith("--steps"))
    assert " ".join(steps.split()).endswith("(default: 80)" if name == "finetune_lora" else "(default: 60)")
    model = " ".join(next(e for e in entries if e.startswith("--model")).split())
    assert "(default: SmolLM2-135M-Instruct" in model and "None" not in model


def test_step_progress_bar_shows_optimizer_steps_across_epochs(tmp_path, capsys):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_peft.tasks import StepProgressBar

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).square().mean()
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2)  # 3 batches an epoch
    bar = StepProgressBar()
    trainer = L.Trainer(max_steps=5, accumulate_grad_batches=2, callbacks=[bar], accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(Tiny(), data)
    printed = capsys.readouterr().out
    assert trainer.global_step == 5 and trainer.current_epoch >= 3  # 10 batches over 4 epochs
    assert "Training steps" in printed and "5/5" in printed and "Epoch" not in printed
    assert "6/5" not in printed and "train_loss=" in printed
    assert bar.train_progress_bar.n == 5 and bar.train_progress_bar.total == 5


def test_model_that_is_not_a_model_dir_is_refused(tmp_path):
    from lightning_peft.tasks import load_causal_lm

    with pytest.raises(ValueError, match="neither a .gguf file nor a Hugging Face model directory"):
        load_causal_lm(tmp_path)


def test_lr_schedule_warms_up_linearly_then_decays_to_the_floor():
    from lightning_peft.tasks import lr_lambda

    assert [lr_lambda(s, 10, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    cosine = [lr_lambda(s, 10, warmup_steps=4, min_lr_ratio=0.1) for s in range(4, 10)]
    assert cosine[0] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(cosine, cosine[1:]))
    linear = [lr_lambda(s, 10, warmup_steps=4, schedule="linear") for s in range(4, 10)]
    assert linear == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert lr_lambda(7, 10, warmup_steps=2, schedule="constant") == 1.0


def test_module_optimizes_only_adapters_and_steps_the_schedule_per_step(tiny_model_dir, tmp_path):
    import lightning as L

    from lightning_peft import InstructionDataModule, LoRACallback
    from lightning_peft.tasks import CausalLMModule, load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dir)
    data = InstructionDataModule(tokenizer, train=DATA / "triples_train.jsonl", batch_size=2)
    module = CausalLMModule(model, lr=1e-2, warmup_steps=2, weight_decay=0.1)
    trainer = L.Trainer(max_steps=5, callbacks=[LoRACallback(r=2, target_modules=["q_proj"])],
                        accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    (optimizer,) = trainer.optimizers
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(optimized) == len(lora) == 4 and all(any(p is q for q in lora) for p in optimized)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    # 5 scheduler steps: warmup 1/2, 2/2, then cosine over steps 2..4 -> 0 at step 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert [s for s, _ in module.history["train_loss"]] == [0, 1, 2, 3, 4]
    assert all(loss > 0 for _, loss in module.history["train_loss"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0}, "lr must be a finite positive number"),
    ({"schedule": "step"}, "schedule must be one of"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio must be in"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer"),
])
def test_module_rejects_bad_settings(kwargs, message):
    from lightning_peft.tasks import CausalLMModule

    with pytest.raises(ValueError, match=message):
        CausalLMModule(torch.nn.Linear(2, 2), **kwargs)


def test_shared_run_arguments_state_each_default_once_in_a_plain_defaults_parser():
    """benchmarks/methods.py builds its parser with argparse's ArgumentDefaultsHelpFormatter."""
    import argparse

    from lightning_peft.tasks import add_run_arguments

    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(parser, DATA)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    text = " ".join(parser.format_help().split())
    assert text.count("(default") == 8  # model, train, eval, eval-limit, max-new-tokens, threads, seed, steps
    assert "(default: None)" not in text and "(default: 60)" in text


def test_step_progress_bar_refuses_a_bad_refresh_rate_and_can_be_silenced(tmp_path, capsys):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_peft.tasks import StepProgressBar

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="refresh_rate must be an integer >= 0"):
            StepProgressBar(refresh_rate=bad)

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_steps=3, callbacks=[StepProgressBar(refresh_rate=0)], accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))
    assert trainer.global_step == 3 and "Training steps" not in capsys.readouterr().out
