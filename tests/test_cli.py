"""The ``lightning-peft`` command: ``fit`` from every shipped YAML, config errors before any model
loads, ``merge`` round trips through ``AutoModelForCausalLM``, ``generate``, ``--help``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from lightning_peft import apply_peft, load_adapter, save_adapter
from lightning_peft.callbacks import PEFTCallback, peft_callback
from lightning_peft.cli import main, merge_to_directory
from lightning_peft.methods import methods
from tests import _tiny

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "examples" / "configs"
DATA = ROOT / "examples" / "data"
YAMLS = sorted(CONFIGS.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(ROOT)  # the shipped YAMLs name their data relative to the repository root
    yield
    torch.set_num_threads(threads)


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained on the shipped triples."""
    corpus = [f"{r['instruction']} {r['input']} {r['output']}" for r in _records("triples_train.jsonl")]
    tok = _tiny.tokenizer(corpus, vocab_size=300)
    path = tmp_path_factory.mktemp("tiny_llama")
    _tiny.llama(vocab=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT (positions for the YAMLs' max_length 128) with a WordPiece tokenizer over
    the words of the shipped sentence pairs."""
    words = sorted({w for r in _records("roles_train.jsonl") + _records("roles_eval.jsonl")
                    for key in ("text", "text_pair") for w in r[key].lower().replace(".", " . ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48, max_position_embeddings=128,
                                  num_labels=2)
    path = tmp_path_factory.mktemp("tiny_bert")
    transformers.BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _method_callback(config: dict) -> type:
    """The PEFT callback class of a shipped YAML (its last callback)."""
    class_path = config["trainer"]["callbacks"][-1]["class_path"]
    module, _, name = class_path.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert issubclass(cls, PEFTCallback), f"the YAML's last callback is {class_path}, not a PEFT callback"
    return cls


def test_every_registered_method_has_a_shipped_yaml():
    shipped = {path.stem for path in YAMLS}
    missing = sorted(m.name for m in methods() if m.name not in shipped)
    assert not missing, f"add examples/configs/<method>.yaml for {missing} (copy the shape of lora.yaml)"
    for method in methods():
        assert _method_callback(_config(CONFIGS / f"{method.name}.yaml")).method == method.name


def _fusion_inputs(llama_dir: Path, tmp_path: Path) -> list[str]:
    """Two bottleneck adapters for AdapterFusion, saved for the tiny Llama."""
    dirs = []
    for i in range(2):
        model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
        torch.manual_seed(i)
        apply_peft(model, peft_callback("adapter", bottleneck=8, config="houlsby").config)
        dirs.append(str(save_adapter(model, tmp_path / f"adapter_{i}")))
    return dirs


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_fit_runs_from_the_shipped_yaml(path, tmp_path, llama_dir, bert_dir, capsys):
    """Two optimizer steps from each YAML, as a user runs it with the model and outputs
    overridden on the command line; the adapter it writes reproduces the trained model."""
    config = _config(path)
    causal = config["model"]["class_path"].endswith("CausalLMModule")
    model_dir = llama_dir if causal else bert_dir
    adapter = tmp_path / "adapter"
    args = ["fit", "--config", str(path), f"--model.model={model_dir}", "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=1",
            f"--trainer.callbacks.init_args.adapter_dir={adapter}"]
    if _method_callback(config).method == "adalora":  # its pruning schedule must fit in the 2 steps
        args += ["--trainer.callbacks.init_args.tinit=0", "--trainer.callbacks.init_args.tfinal=0"]
    if _method_callback(config).method == "adapter_fusion":
        dirs = json.dumps(_fusion_inputs(llama_dir, tmp_path))
        args.append(f"--trainer.callbacks.init_args.adapter_dirs={dirs}")
    cli = main(args)
    assert cli.trainer.global_step == 2
    out = capsys.readouterr().out
    assert "lightning-peft fit | parameters: trainable params:" in out and "train_loss:" in out

    trained = cli.model.model.eval()
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSequenceClassification
    fresh = auto.from_pretrained(model_dir).eval()
    peft = [c for c in cli.trainer.callbacks if isinstance(c, PEFTCallback)]
    if peft[0].method == "qlora":  # the file is LoRA's: the base is quantized as in training first
        apply_peft(fresh, peft[0].config)
    load_adapter(fresh, adapter)
    ids = torch.tensor([[5, 17, 3, 40, 22, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_print_config_and_callbacks_from_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIGS / "lora.yaml"), "--trainer.callbacks.r=4", "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    lora = printed["trainer"]["callbacks"][-1]
    assert lora["class_path"].endswith("LoRACallback") and lora["init_args"]["r"] == 4
    assert lora["init_args"]["alpha"] == 16 and printed["model"]["init_args"]["lr"] == 0.002

    # everything from flags, the callback appended by its class name
    with pytest.raises(SystemExit):
        main(["fit", "--model=CausalLMModule", "--data=InstructionDataModule",
              f"--data.train={DATA / 'triples_train.jsonl'}", "--trainer.callbacks+=IA3Callback",
              "--trainer.callbacks+=LoRACallback", "--trainer.callbacks.r=16", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]] == \
        ["IA3Callback", "LoRACallback"]
    assert printed["trainer"]["callbacks"][-1]["init_args"]["r"] == 16
    assert printed["model"]["class_path"].rsplit(".", 1)[-1] == "CausalLMModule"


@pytest.mark.parametrize(("override", "named"), [
    ("--trainer.callbacks.init_args.rank=8", "rank"),                       # unknown key
    ("--trainer.callbacks.init_args.r=eight", 'Parser key "r":\n          Expected a <class \'int\'>'),
    ("--trainer.callbacks.init_args.r=0", "trainer.callbacks[1] (LoRACallback): r must be"),  # method's check
    ("--trainer.callbacks.init_args.target_modules=[q_proj]", None),        # fine: reaches the model
    ("--model.init_args.lr=-1", "model.init_args (CausalLMModule): lr must be a finite positive number"),
    ("--model.init_args.lr=.inf", "lr must be a finite positive number, got inf"),
    ("--model.init_args.weight_decay=.nan", "weight_decay must be a finite number >= 0, got nan"),
    ("--model.init_args.betas=[0.9,2.0]", "betas must be two numbers in [0, 1) (AdamW's), got (0.9, 2.0)"),
    ("--data.init_args.batch_size=0", "data.init_args (InstructionDataModule): batch_size must be"),
    ("--data.init_args.batch_sise=4", "batch_sise"),                        # unknown key
    ("--trainer.max_steps=many", "trainer.max_steps"),
])
def test_bad_config_values_fail_naming_the_key_before_the_model_loads(override, named, llama_dir, monkeypatch,
                                                                      capsys):
    class Loaded(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Loaded("the model was loaded")

    monkeypatch.setattr("lightning_peft.tasks.load_causal_lm", refuse)
    args = ["fit", "--config", str(CONFIGS / "lora.yaml"), f"--model.model={llama_dir}",
            "--trainer.accelerator=cpu", "--trainer.logger=false", override]
    if named is None:
        with pytest.raises(Loaded):  # the check above would have caught a model load
            main(args)
        return
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_an_over_long_record_is_a_usage_error_before_the_model_loads(llama_dir, monkeypatch, capsys):
    """Without truncation an over-long record used to be a traceback from the trainer's setup."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lightning_peft.tasks.load_causal_lm", refuse)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIGS / "lora.yaml"), f"--model.model={llama_dir}",
              "--trainer.accelerator=cpu", "--trainer.logger=false", "--data.init_args.max_length=8"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "data.init_args (InstructionDataModule): " in err and "triples_train.jsonl line 1" in err
    assert "max_length" in err


def test_model_path_that_is_not_a_model_is_a_config_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "lora.yaml"), f"--model.model={tmp_path}"])
    assert "is neither a .gguf file nor a Hugging Face model directory" in capsys.readouterr().err


def test_output_paths_and_ckpt_path_are_checked_before_the_model_loads(llama_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """``adapter_dir`` (written when fit ends) or ``default_root_dir`` that is a file, and a
    ``ckpt_path`` that does not exist, are usage errors naming the key before anything loads (the
    adapter_dir one used to fail after the whole training, and the others with tracebacks)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lightning_peft.tasks.load_causal_lm", refuse)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["fit", "--config", str(CONFIGS / "lora.yaml"), f"--model.model={llama_dir}",
            "--trainer.accelerator=cpu", "--trainer.logger=false"]
    for override, named in [(f"--trainer.callbacks.init_args.adapter_dir={a_file}",
                             "trainer.callbacks[1] (LoRACallback): adapter_dir: "),
                            (f"--trainer.default_root_dir={a_file}", "trainer.default_root_dir: "),
                            (f"--ckpt_path={tmp_path / 'missing.ckpt'}", "ckpt_path: ")]:
        with pytest.raises(SystemExit) as exit_:
            main([*base, override])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert named in err and ("is a file, not a directory" in err or "does not exist" in err), err
    assert a_file.read_text() == "x"


def test_errors_before_the_first_batch_are_usage_errors(llama_dir, tmp_path, capsys):
    """A target that matches nothing, a checkpoint of another adapter and a subcommand the module
    does not implement come out as usage errors naming the subcommand (they were tracebacks);
    they are raised before the first batch, unlike errors of the training itself."""
    base = ["--config", str(CONFIGS / "lora.yaml"), f"--model.model={llama_dir}", "--trainer.accelerator=cpu",
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1"]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *base, "--trainer.callbacks.init_args.target_modules=[q_proj,v_prj]"])
    assert exit_.value.code == 2
    assert "fit: target_modules entry 'v_prj'" in capsys.readouterr().err
    main(["fit", *base, "--trainer.enable_checkpointing=true", "--trainer.val_check_interval=1",
          "--trainer.limit_val_batches=1"])
    (ckpt,) = tmp_path.rglob("*.ckpt")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *base, "--trainer.callbacks.init_args.r=4", f"--ckpt_path={ckpt}"])
    assert exit_.value.code == 2
    assert "fit: checkpoint does not match the model's adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["test", *base])
    assert exit_.value.code == 2
    assert "test: No `test_step()` method defined" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- merge


def _adapted(llama_dir: Path, method: str, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    torch.manual_seed(0)
    apply_peft(model, peft_callback(method, **kwargs).config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: every adapter tensor moved off its start
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
    return model.eval()


IDS = torch.tensor([[1, 8, 33, 2, 250, 71, 14, 9, 120]])


@pytest.mark.parametrize(("method", "kwargs", "flags"), [
    ("lora", {"r": 4, "target_modules": "all-linear"}, []),
    ("lora", {"r": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}, []),
    ("ia3", {}, []),
    ("qlora", {"r": 4, "target_modules": "all-linear", "compute_dtype": "float32"}, ["--qlora"]),
    ("intrinsic_dimension", {"d": 40}, []),
    ("trainable_tokens", {"token_indices": [1, 33, 250]}, []),
], ids=["lora", "dora", "ia3", "qlora", "intrinsic", "tokens"])
def test_merge_writes_a_transformers_model_with_the_adapted_logits(method, kwargs, flags, llama_dir, tmp_path,
                                                                   capsys):
    model = _adapted(llama_dir, method, **kwargs)
    adapter = save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    out = main(["merge", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                *flags])
    assert "wrote" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert set(merged.state_dict()) == set(transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
                                           .state_dict())  # no adapter tensor left
    with torch.no_grad():
        got = merged(input_ids=IDS).logits
    # fp32: (W0 + s·B·A)·x against W0·x + s·B·(A·x): rounding only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert not torch.allclose(got, transformers.AutoModelForCausalLM.from_pretrained(llama_dir)(input_ids=IDS)
                              .logits, atol=1e-3)  # the adapter changed the model
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("Extract the triples")["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(llama_dir)("Extract the triples")["input_ids"]


def test_merge_in_bfloat16(llama_dir, tmp_path):
    model = _adapted(llama_dir, "lora", r=4, target_modules="all-linear")
    adapter = save_adapter(model, tmp_path / "adapter")
    out = main(["merge", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                "--dtype", "bf16"])
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        want, got = model(input_ids=IDS).logits, merged(input_ids=IDS).logits.float()
    # bf16 weights and activations (8 significant bits): the tiny model's logits (|logit| <= ~0.5)
    # within 0.1 of the fp32 adapted model's, 0.01 on average
    assert (got - want).abs().max() <= 0.1 and (got - want).abs().mean() <= 0.01


def test_qlora_merge_of_gpt2_keeps_its_conv1d_layout(tmp_path):
    """GPT-2's projections are ``Conv1D`` (weight (in, out)): QLoRA quantizes them (out, in), and
    the export used to give ``nn.Linear`` layers (out, in) that ``from_pretrained`` refused, while
    ``merge --qlora`` left the Conv1D bases dense (LoRA on the dense base, not the trained QLoRA
    model, off by 4e-3). Now both give the QLoRA model's logits through ``AutoModelForCausalLM``."""
    from transformers.pytorch_utils import Conv1D

    from lightning_peft import apply_qlora
    from lightning_peft.methods.qlora import merge_and_dequantize

    corpus = [f"{r['instruction']} {r['input']} {r['output']}" for r in _records("triples_train.jsonl")]
    tok = _tiny.tokenizer(corpus, vocab_size=300)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=24, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=32, bos_token_id=0, eos_token_id=0))
    base.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    model = apply_qlora(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval(), r=2,
                        target_modules=["c_attn", "c_fc"], compute_dtype="float32")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        want = model(input_ids=IDS).logits
    adapter = save_adapter(model, tmp_path / "adapter")
    out = main(["merge", "--base", str(tmp_path / "gpt2"), "--adapter", str(adapter), "--out",
                str(tmp_path / "m"), "--qlora"])
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    merged = merge_and_dequantize(model, torch.float32)
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    merged.save_pretrained(tmp_path / "direct")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "direct").eval()
    with torch.no_grad():
        got = reloaded(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_merge_refuses_a_method_that_does_not_merge(llama_dir, tmp_path, capsys):
    model = _adapted(llama_dir, "prompt_tuning", num_virtual_tokens=4)
    adapter = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(SystemExit):
        main(["merge", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")])
    assert "method 'prompt_tuning' cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_merge_argument_errors(llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--base", str(llama_dir), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")])
    assert "is not an adapter directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", "--base", str(tmp_path), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")])
    assert "--base" in capsys.readouterr().err
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "adapter_config.json").write_text("{}")
    bare = str(tmp_path / "no_weights")
    for command in (["merge", "--out", str(tmp_path / "m")], ["generate", "--prompt", "hi"]):
        with pytest.raises(SystemExit):
            main([command[0], "--base", str(llama_dir), "--adapter", bare, *command[1:]])
        assert "has no adapter_model.safetensors" in capsys.readouterr().err


def test_merge_never_replaces_its_inputs_or_a_run_directory(llama_dir, tmp_path, capsys, monkeypatch):
    """``--out`` is replaced only when it is an earlier merge: naming the run directory that holds
    the adapter (and checkpoints, logs), the adapter itself, the base model or any directory that
    is not a model directory is refused before anything is read, and every file stays (a run
    directory given as --out used to be deleted with the adapter in it)."""
    run = tmp_path / "run"
    adapter = save_adapter(_adapted(llama_dir, "lora", r=4, target_modules=["q_proj"]), run / "adapter")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    files = sorted(p for p in tmp_path.rglob("*"))
    base_files = sorted(p for p in llama_dir.rglob("*"))
    for out, says in [(run, "is or holds --adapter"), (adapter, "is or holds --adapter"),
                      (llama_dir, "is or holds --base"), (run / "checkpoints", "is not a model directory")]:
        with pytest.raises(SystemExit):
            main(["merge", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(out)])
        assert says in capsys.readouterr().err
        assert sorted(p for p in tmp_path.rglob("*")) == files
        assert sorted(p for p in llama_dir.rglob("*")) == base_files
    with pytest.raises(ValueError, match="out: .* is or holds adapter"):
        merge_to_directory(str(llama_dir), str(adapter), run)
    # an earlier merge is replaced; "." is the directory it names
    first = main(["merge", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")])
    monkeypatch.chdir(first)
    again = main(["merge", "--base", str(llama_dir), "--adapter", str(adapter), "--out", "."])
    assert again == first.resolve() and (again / "model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"checkpoint"


def test_merge_stages_in_a_new_hidden_directory_and_leaves_its_siblings(llama_dir, tmp_path, monkeypatch):
    """The merge is written into a new hidden sibling of ``--out`` and renamed into place: a
    directory named ``<out>.partial`` (here the adapter itself, and a folder of the user's) is
    never touched (it used to be deleted as the staging directory), and a failed or verified
    write leaves no staging directory behind."""
    adapted = _adapted(llama_dir, "lora", r=4, target_modules=["q_proj"])
    adapter = save_adapter(adapted, tmp_path / "run.partial")
    notes = tmp_path / "merged.partial"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me\n")
    adapter_files = {p: p.read_bytes() for p in adapter.rglob("*") if p.is_file()}
    main(["merge", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(tmp_path / "run")])
    main(["merge", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    assert {p: p.read_bytes() for p in adapter.rglob("*") if p.is_file()} == adapter_files
    assert (notes / "todo.txt").read_text() == "keep me\n"
    assert all((tmp_path / out / "model.safetensors").is_file() for out in ("run", "merged"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    from lightning_peft import cli

    monkeypatch.setattr(cli, "_check_written", lambda *args: "the written model differs")
    with pytest.raises(ValueError, match="differs; nothing was written"):
        merge_to_directory(str(llama_dir), str(adapter), tmp_path / "third")
    assert not (tmp_path / "third").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------- generate


def test_generate_streams_the_greedy_answer_of_the_adapted_model(llama_dir, tmp_path, capsys):
    model = _adapted(llama_dir, "lora", r=4, target_modules="all-linear")
    adapter = save_adapter(model, tmp_path / "adapter")
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    prompt = "Extract the triples: Jana Haddad lives in Perth."
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    want = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
    assert want.strip()
    text = main(["generate", "--base", str(llama_dir), "--adapter", str(adapter), "--prompt", prompt,
                 "--max-new-tokens", "12"])
    assert text == want
    assert capsys.readouterr().out.strip() == want.strip()


# ----------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize(("command", "shows"), [
    ([], ["fit", "merge", "generate"]),
    (["fit"], ["--trainer.max_steps", "--model", "--data", "--print_config"]),
    (["merge"], ["--base", "--adapter", "--out", "--dtype", "--qlora"]),
    (["generate"], ["--base", "--adapter", "--prompt", "--max-new-tokens", "--temperature"]),
])
def test_help_of_each_command(command, shows, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(option in out for option in shows), out


def test_console_command_runs_as_a_module():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "lightning_peft", "merge", "--help"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage: lightning-peft merge" in result.stdout


def test_console_script_entry_point_is_declared():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lightning-peft"] == "lightning_peft.cli:main"


def test_console_entry_point_returns_none_so_the_exit_status_is_0(llama_dir, tmp_path, monkeypatch, capsys):
    """The console script calls ``sys.exit(main())``: anything but None would exit with status 1."""
    adapter = save_adapter(_adapted(llama_dir, "ia3"), tmp_path / "adapter")
    monkeypatch.setattr(sys, "argv", ["lightning-peft", "generate", "--base", str(llama_dir), "--adapter",
                                      str(adapter), "--prompt", "Extract", "--max-new-tokens", "3"])
    assert main() is None
    assert capsys.readouterr().out.strip()


def test_merge_of_a_base_read_from_gguf(llama_dir, tmp_path, monkeypatch):
    """transformers marks a model read from a GGUF file with its GGUF "quantizer" (the tensors are
    dense fp32) and ``save_pretrained`` refuses such a model: merge drops the marks."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    from lightning_peft import cli
    from lightning_peft.tasks import load_causal_lm

    def as_if_from_gguf(base):
        model, tokenizer = load_causal_lm(base)
        quantizer = GgufHfQuantizer(GgufConfig())
        model.hf_quantizer, model.is_quantized = quantizer, True
        model.config.quantization_config = quantizer.quantization_config
        return model, tokenizer

    monkeypatch.setattr(cli, "load_causal_lm", as_if_from_gguf)
    model = _adapted(llama_dir, "lora", r=4, target_modules="all-linear")
    adapter = save_adapter(model, tmp_path / "adapter")
    out = main(["merge", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")])
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(transformers.AutoModelForCausalLM.from_pretrained(out)(input_ids=IDS).logits,
                                   model(input_ids=IDS).logits, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("command", ["fit", "validate"])  # validate used to fail in the loss (IndexError)
def test_classifier_and_data_must_agree_on_the_classes(command, bert_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([command, "--config", str(CONFIGS / "bitfit.yaml"), f"--model.model={bert_dir}",
              "--model.init_args.num_labels=3", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.logger=false", "--trainer.accelerator=cpu"])
    assert "model.init_args.num_labels is 3 but the data has 2 classes" in capsys.readouterr().err
