"""Smoke run of examples/finetune_lora.py on a tiny random Llama saved to a local directory."""

from __future__ import annotations

import importlib.util
import json
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


def _example():
    spec = importlib.util.spec_from_file_location("finetune_lora", ROOT / "examples" / "finetune_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_and_writes_adapter_plot_and_numbers(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    results = _example().main(["--model", str(tiny_model_dir), "--steps", "6", "--batch-size", "4",
                               "--eval-limit", "4", "--val-every", "3", "--max-new-tokens", "4",
                               "--r", "4", "--targets", "q_proj,v_proj", "--threads", "1",
                               "--out", str(out)])
    printed = capsys.readouterr().out
    assert "Exact match before" in printed and "after" in printed
    assert "trainable params: " in printed

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


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--model", "/no/such/model"], "--model: no such file or directory"),
    (["--train", "/no/such.jsonl"], "--train: no such file"),
    (["--lr", "-1"], "--lr and --alpha must be positive"),
])
def test_example_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _example().parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


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
    ({"lr": 0}, "lr must be a positive number"),
    ({"schedule": "step"}, "schedule must be one of"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio must be in"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer"),
])
def test_module_rejects_bad_settings(kwargs, message):
    from lightning_peft.tasks import CausalLMModule

    with pytest.raises(ValueError, match=message):
        CausalLMModule(torch.nn.Linear(2, 2), **kwargs)
