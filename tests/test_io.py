"""Adapter files in HF PEFT's format and adapter state dicts (lightning_peft.io).

Checked against HF PEFT itself: our files load into ``PeftModel.from_pretrained`` and give the
same logits, files ``save_pretrained`` wrote load into our layers and give the same logits, and
every bad input fails with an error that names it while the model stays bit-for-bit unchanged.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import struct
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from lightning_peft import merge_adapters
from lightning_peft.io import adapter_state_dict, load_adapter, load_adapter_state_dict, save_adapter
from lightning_peft.methods.lora import LoRALinear, ModulesToSave, apply_lora, lora_layers

peft = pytest.importorskip("peft")

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# ------------------------------------------------------------------------------- tiny models


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1)).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3)).eval()


def _roberta() -> nn.Module:
    """Its ``classifier`` is a head with two Linears (``dense``, ``out_proj``)."""
    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, num_labels=3)).eval()


def _electra() -> nn.Module:
    torch.manual_seed(0)
    return ElectraForSequenceClassification(ElectraConfig(
        vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3)).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "roberta": _roberta, "electra": _electra}


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=_ids()).logits


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 2) -> None:
    """Give every trainable tensor (lora_A/B, modules trained in full, biases) new random values."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(0.2 * torch.randn(param.shape, generator=gen))


def _snapshot(model: nn.Module) -> tuple:
    """Everything a load could change: tensors, requires_grad, module structure, and each LoRA
    layer's settings (alpha, scaling, rsLoRA, merged), which live outside the state dict."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [(n, type(m)) for n, m in model.named_modules()],
            [(n, m.r, m.alpha, m.scaling, m.use_rslora, m.merged) for n, m in lora_layers(model)])


def _assert_unchanged(model: nn.Module, snap: tuple) -> None:
    state, grads, modules, layers = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == grads
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert [(n, m.r, m.alpha, m.scaling, m.use_rslora, m.merged) for n, m in lora_layers(model)] == layers


def _peft_lora_names(peft_model: nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if isinstance(m, LoraLayer)}


def _ours(kind: str, *calls: dict) -> nn.Module:
    model = MODELS[kind]()
    for kwargs in calls:
        apply_lora(model, **kwargs)
    _perturb(model)
    return model


# Our adapters, each a sequence of apply_lora calls (two calls: per-layer ranks and alphas).
OURS = {
    "llama-qv": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-patterns-rslora-lm_head": (
        "llama", dict(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], use_rslora=True),
        dict(r=2, alpha=3, target_modules=["v_proj", "down_proj"], use_rslora=True)),
    "llama-one-layer": ("llama", dict(r=2, alpha=4, target_modules=["model.layers.0.self_attn.q_proj"])),
    "gpt2-conv1d-bias-all": ("gpt2", dict(r=2, alpha=4, target_modules=["c_attn", "attn.c_proj"],
                                          bias="all")),
    "bert-classifier-lora_only": ("bert", dict(r=2, alpha=4, target_modules=["query", "value"],
                                               modules_to_save=["classifier"], bias="lora_only")),
    "bert-classifier-bias-all": ("bert", dict(r=2, alpha=4, target_modules=["query", "value"],
                                              modules_to_save=["classifier"], bias="all")),
    # The classifier head holds Linears that "all-linear" selects: no LoRA inside its copies.
    "roberta-classifier-all-linear": ("roberta", dict(r=2, alpha=4, target_modules="all-linear",
                                                      modules_to_save=["classifier"])),
}


# ----------------------------------------------------------------- (a) ours -> file -> HF PEFT


@pytest.mark.parametrize("case", list(OURS))
def test_our_file_loads_in_hf_peft(case: str, tmp_path: Path) -> None:
    kind, *calls = OURS[case]
    model = _ours(kind, *calls)
    assert save_adapter(model, tmp_path / "a") == tmp_path / "a"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "a").eval()
    ours_logits = _logits(model)
    torch.testing.assert_close(_logits(theirs), ours_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(MODELS[kind]()), ours_logits, atol=1e-3)  # the adapter matters
    assert _peft_lora_names(theirs) == {n for n, _ in lora_layers(model)}


def test_config_describes_the_layers(tmp_path: Path) -> None:
    kind, *calls = OURS["llama-patterns-rslora-lm_head"]
    model = _ours(kind, *calls)
    model.config._name_or_path = "org/tiny-llama"
    config = json.loads((save_adapter(model, tmp_path) / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "org/tiny-llama" and config["inference_mode"] is True
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 3, True)  # 4 layers of r=2
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert config["rank_pattern"] == {f"model.layers.{i}.self_attn.q_proj": 4 for i in (0, 1)}
    assert config["alpha_pattern"] == {f"model.layers.{i}.self_attn.q_proj": 8 for i in (0, 1)}
    assert config["modules_to_save"] == ["lm_head"] and config["bias"] == "none"
    assert config["fan_in_fan_out"] is False
    one = _ours(*OURS["llama-one-layer"])
    config = json.loads((save_adapter(one, tmp_path / "one", "given/name") / CONFIG).read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]  # "q_proj" would select 2
    assert config["base_model_name_or_path"] == "given/name"
    gpt2_dir = save_adapter(_ours(*OURS["gpt2-conv1d-bias-all"]), tmp_path / "g")
    gpt2 = json.loads((gpt2_dir / CONFIG).read_text())
    assert gpt2["fan_in_fan_out"] is True and gpt2["bias"] == "all"
    assert sorted(gpt2["target_modules"]) == ["c_attn", "transformer.h.0.attn.c_proj",
                                              "transformer.h.1.attn.c_proj"]


# ----------------------------------------------------------------- (b) HF PEFT -> file -> ours

THEIRS = {
    "llama-patterns-rslora-lm_head": ("llama", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True,
        lora_dropout=0.1, task_type="CAUSAL_LM")),
    "gpt2-conv1d-bias-all": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                          fan_in_fan_out=True, bias="all")),
    "bert-seq-cls-lora_only": ("bert", dict(r=2, lora_alpha=4, target_modules=["query", "value"],
                                            modules_to_save=["classifier"], bias="lora_only",
                                            task_type="SEQ_CLS")),
    "bert-classifier-bias-all": ("bert", dict(r=2, lora_alpha=4, target_modules=["query", "key"],
                                              modules_to_save=["classifier"], bias="all",
                                              init_lora_weights="gaussian")),
    # PEFT adds "classifier" and "score" to modules_to_save for SEQ_CLS and lists the classifier's
    # Linears in target_modules, but adapts nothing inside a module it trains in full.
    "roberta-seq-cls-all-linear": ("roberta", dict(r=2, lora_alpha=4, target_modules="all-linear",
                                                   task_type="SEQ_CLS")),
    # ... also where a rank_pattern entry gives the classifier's Linear a group of its own.
    "electra-seq-cls-all-linear-rank-pattern": ("electra", dict(
        r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS",
        rank_pattern={"classifier.dense": 4, "layer.0.attention.self.query": 3})),
}


@pytest.mark.parametrize("case", list(THEIRS))
def test_hf_peft_file_loads_in_ours(case: str, tmp_path: Path) -> None:
    kind, kwargs = THEIRS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(**kwargs))
        _perturb(theirs)
        theirs.eval().save_pretrained(tmp_path / "peft")
    model = load_adapter(MODELS[kind](), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(model), _logits(theirs), atol=1e-5, rtol=0)
    assert {n for n, _ in lora_layers(model)} == _peft_lora_names(theirs)
    # Saving what we loaded gives back PEFT's tensors (less its bias="all" copies inside the
    # modules trained in full), bit for bit.
    save_adapter(model, tmp_path / "ours")
    peft_tensors = {k: v for k, v in load_file(tmp_path / "peft" / WEIGHTS).items()
                    if ".original_module." not in k and ".modules_to_save." not in k}
    ours = load_file(tmp_path / "ours" / WEIGHTS)
    assert sorted(ours) == sorted(peft_tensors)
    assert all(torch.equal(ours[k], peft_tensors[k]) for k in ours)


@pytest.mark.parametrize("tie", [False, True])
def test_hf_peft_lora_on_the_output_head_loads_with_its_base_weight(tie: bool, tmp_path: Path) -> None:
    """PEFT writes the base weight of a targeted embedding or head beside the adapter
    (``save_embedding_layers="auto"``: ``lm_head.base_layer.weight``) and copies it in on loading,
    so a head whose rows changed (a resized, trained vocabulary) comes back; ours loads it the
    same way (such files used to be refused as holding an unexpected tensor). A head of another
    shape is refused and the model stays as it was."""
    def llama() -> nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            tie_word_embeddings=tie)).eval()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=3, lora_alpha=7,
                                                              target_modules=["q_proj", "lm_head"]))
        _perturb(theirs)
        with torch.no_grad():  # rows the base head did not have (as after resizing and training)
            theirs.base_model.model.lm_head.base_layer.weight[-5:].normal_()
        theirs.eval().save_pretrained(tmp_path / "peft")
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "peft" / WEIGHTS)
    model = load_adapter(llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(model), _logits(theirs), atol=1e-5, rtol=0)
    assert {n for n, _ in lora_layers(model)} == _peft_lora_names(theirs)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=70, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=tie)).eval()
    snap = _snapshot(wider)
    with pytest.raises(ValueError, match=r"lm_head\.base_layer\.weight: shape \(64, 16\) .* vs \(70, 16\)"):
        load_adapter(wider, tmp_path / "peft")
    _assert_unchanged(wider, snap)


def test_modules_to_save_from_a_hf_peft_file_select_what_peft_selects(tmp_path: Path) -> None:
    """PEFT matches ``modules_to_save`` entries as plain suffixes of module names: ``"norm"`` trains
    the final norm and every layer's two norms, ``"head"`` the ``lm_head``. Loading its file selects
    the same modules (it used to take ``"norm"`` for the final norm only and refuse the file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=3, lora_alpha=7, target_modules=["q_proj"],
                                                               modules_to_save=["norm", "head"]))
        _perturb(theirs)
        theirs.eval().save_pretrained(tmp_path / "peft")
    model = load_adapter(_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(model), _logits(theirs), atol=1e-5, rtol=0)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, ModulesToSave))
    assert wrapped == ["lm_head", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                       "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                       "model.norm"]
    # and back: PEFT loads what we save from it
    save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again), _logits(theirs), atol=1e-5, rtol=0)


def test_hf_peft_per_layer_ranks_and_scalings(tmp_path: Path) -> None:
    kind, kwargs = THEIRS["llama-patterns-rslora-lm_head"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(MODELS[kind](), peft.LoraConfig(**kwargs)).save_pretrained(tmp_path)
    model = load_adapter(_llama(), tmp_path)
    layers = dict(lora_layers(model))
    q0, q1 = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.1.self_attn.q_proj"]
    v0 = layers["model.layers.0.self_attn.v_proj"]
    assert (q0.r, q0.alpha, q1.r, v0.r, v0.alpha) == (2, 8, 4, 4, 3)
    assert q0.scaling == pytest.approx(8 / 2 ** 0.5) and v0.scaling == pytest.approx(3 / 2)
    assert q0.dropout == 0.1 and q0.use_rslora
    assert isinstance(model.lm_head, ModulesToSave) and model.lm_head.modules_to_save.weight.requires_grad


# ------------------------------------------------------------------------- (c) ours -> ours


class _Wrapper(nn.Module):
    """Stands in for a LightningModule: holds the transformers model plus modules of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)
        self.model = _llama()

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids=input_ids)


def test_round_trip_through_a_wrapper(tmp_path: Path) -> None:
    wrapper = _Wrapper()
    apply_lora(wrapper, r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    _perturb(wrapper)
    save_adapter(wrapper, tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys  # "model." stripped
    assert "base_model.model.lm_head.weight" in keys and len(keys) == 2 * 2 * 2 + 1
    for target in (_Wrapper(), _llama()):  # into a fresh wrapper and into the bare model
        loaded = load_adapter(target, tmp_path).eval()
        assert torch.equal(_logits(loaded), _logits(wrapper.eval()))
    assert len(lora_layers(loaded)) == 4 and not isinstance(target, LoRALinear)


def test_round_trip_dtypes_existing_and_merged_layers(tmp_path: Path) -> None:
    source = _ours(*OURS["llama-patterns-rslora-lm_head"])
    source.to(torch.bfloat16)
    save_adapter(source, tmp_path)
    assert {t.dtype for t in load_file(tmp_path / WEIGHTS).values()} == {torch.bfloat16}
    expected = dict(adapter_state_dict(source))
    # Into an fp32 model: cast to the destination dtype.
    loaded = load_adapter(_llama(), tmp_path)
    for name, tensor in adapter_state_dict(loaded).items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name].float()), name
    # Into a model that already has the layers (other alpha, merged): values and scaling from the file.
    reference = _logits(loaded.eval())
    target = _llama()
    apply_lora(target, r=4, alpha=1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    apply_lora(target, r=2, alpha=1, target_modules=["v_proj", "down_proj"])
    merge_adapters(target)
    load_adapter(target, tmp_path)
    assert all(layer.merged for _, layer in lora_layers(target))
    assert all(layer.use_rslora for _, layer in lora_layers(target))
    torch.testing.assert_close(_logits(target.eval()), reference, atol=1e-5, rtol=0)


def test_adapter_state_dict_round_trip() -> None:
    wrapper = _Wrapper()
    apply_lora(wrapper, r=2, alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"], bias="all")
    _perturb(wrapper)
    state = adapter_state_dict(wrapper)
    assert "model.model.layers.1.self_attn.q_proj.lora_B" in state  # names as in the model
    assert "model.lm_head.modules_to_save.weight" in state and "head.bias" in state
    assert set(state) <= set(wrapper.state_dict())
    params = dict(wrapper.named_parameters())
    assert all(state[k].data_ptr() == params[k].data_ptr() for k in state)  # no copies
    fresh = _Wrapper()
    apply_lora(fresh, r=2, alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"], bias="all")
    assert load_adapter_state_dict(fresh, {k: v.clone() for k, v in state.items()}) is fresh
    assert torch.equal(_logits(fresh.eval()), _logits(wrapper.eval()))


# --------------------------------------------------------------------------- (d) bad input


def _edit_file(directory: Path, edit) -> None:
    """Rewrite the weights after ``edit(tensors)``, with PEFT's metadata only."""
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})


def _edit_config(directory: Path, unbind: bool = True, **changes) -> None:
    """Change fields of the config. ``unbind``: also drop the copy of the config our weights
    carry in their metadata, making the pair look like files HF PEFT wrote (whose config is not
    checked against the weights)."""
    config = json.loads((directory / CONFIG).read_text())
    config.update(changes)
    (directory / CONFIG).write_text(json.dumps(config))
    if unbind:
        _edit_file(directory, lambda tensors: None)


KEY_A = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
BAD_FILES = {
    "missing": (lambda t: t.pop(KEY_A), r"1 missing \(.*v_proj\.lora_A\.weight"),
    "unexpected": (lambda t: t.update({"base_model.model.model.extra.weight": torch.ones(2)}),
                   r"1 unexpected \(base_model\.model\.model\.extra\.weight"),
    "mis-shaped": (lambda t: t.update({KEY_A: torch.ones(3, 16)}),
                   r"mis-shaped \(.*v_proj\.lora_A\.weight: shape \(3, 16\) in .* vs \(4, 16\)"),
    "not-float": (lambda t: t.update({KEY_A: torch.ones(4, 16, dtype=torch.int64)}), r"dtype torch\.int64"),
    # HF PEFT loads these silently; here they are refused, naming the tensors.
    "nan": (lambda t: t[KEY_A].__setitem__((1, 2), float("nan")),
            r"1 non-finite \(.*v_proj\.lora_A\.weight: 1 NaN/inf"),
    "inf": (lambda t: [t[k].__setitem__((0, 0), float("-inf")) for k in t if "q_proj.lora_B" in k],
            r"2 non-finite \(.*layers\.0\.self_attn\.q_proj\.lora_B\.weight.*layers\.1\."),
}


@pytest.mark.parametrize("adapted", [False, True], ids=["fresh", "adapted"])
@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_bad_tensors_leave_the_model_unchanged(bad: str, adapted: bool, tmp_path: Path) -> None:
    save_adapter(_ours(*OURS["llama-qv"]), tmp_path)
    edit, message = BAD_FILES[bad]
    _edit_file(tmp_path, edit)
    model = _ours(*OURS["llama-qv"]) if adapted else _llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)
    assert adapted or not lora_layers(model)


def test_non_strict_loading(tmp_path: Path) -> None:
    source = _ours(*OURS["llama-qv"])
    save_adapter(source, tmp_path)
    _edit_file(tmp_path, lambda t: (t.pop(KEY_A), t.update({"base_model.model.extra": torch.ones(1)})))
    model = load_adapter(_llama(), tmp_path, strict=False)
    loaded, original = adapter_state_dict(model), adapter_state_dict(source)
    assert len(loaded) == len(original) == 8
    for name in loaded:
        assert torch.equal(loaded[name], original[name]) != (name == "model.layers.1.self_attn.v_proj.lora_A")
    _edit_file(tmp_path, lambda t: t.update({KEY_A: torch.ones(3, 16)}))  # shapes are always checked
    model = _llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="mis-shaped"):
        load_adapter(model, tmp_path, strict=False)
    _assert_unchanged(model, snap)


CONFIG_ERRORS = {
    "peft_type": (dict(peft_type="OFT"), ValueError, "peft_type is 'OFT'; this package loads"),
    "dora": (dict(use_dora=True), ValueError, r"missing .*lora_magnitude_vector"),
    "pissa": (dict(init_lora_weights="pissa"), ValueError, "init_lora_weights='pissa'"),
    "rank": (dict(r=0), ValueError, "r must be a positive integer"),
    "target": (dict(target_modules=["no_such_layer"]), ValueError, "no_such_layer"),
    # PEFT ties the head to the embedding's trained copy; loading its lm_head.weight would change
    # the base's tied weights instead
    "weight-tying": (dict(ensure_weight_tying=True, modules_to_save=["embed_tokens"]), ValueError,
                     "PEFT options not supported here: ensure_weight_tying=True"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_config(case: str, tmp_path: Path) -> None:
    save_adapter(_ours(*OURS["llama-qv"]), tmp_path)
    changes, error, message = CONFIG_ERRORS[case]
    _edit_config(tmp_path, **changes)
    model = _llama()
    snap = _snapshot(model)
    with pytest.raises(error, match=message):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


# Every config value is checked (type, range, pattern syntax) before anything changes; the error
# names the field. "alpha-pattern-late": today an adapted model's earlier layers took the new
# lora_alpha before the bad entry of a later layer raised.
BAD_VALUES = {
    "alpha-nan": (dict(lora_alpha=float("nan")), "lora_alpha"),
    "alpha-inf": (dict(lora_alpha=float("inf")), "lora_alpha"),
    "alpha-negative": (dict(lora_alpha=-8), "lora_alpha"),
    "alpha-string": (dict(lora_alpha="8"), "lora_alpha"),
    "r-float": (dict(r=2.5), "r"),
    "r-bool": (dict(r=True), "r"),
    "rank-pattern-zero": (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    "rank-pattern-string": (dict(rank_pattern={"q_proj": "4"}), "rank_pattern"),
    "alpha-pattern-nan": (dict(alpha_pattern={"v_proj": float("nan")}), "alpha_pattern"),
    "alpha-pattern-negative": (dict(alpha_pattern={"v_proj": -1}), "alpha_pattern"),
    "alpha-pattern-late": (dict(lora_alpha=3, alpha_pattern={"model.layers.1.self_attn.v_proj": "x"}),
                           "alpha_pattern"),
    "pattern-key-regex": (dict(alpha_pattern={"q_proj(": 4}), "alpha_pattern"),
    "pattern-key-empty": (dict(rank_pattern={"": 4}), "rank_pattern"),
    "pattern-not-object": (dict(alpha_pattern=[["q_proj", 4]]), "alpha_pattern"),
    "rslora-string": (dict(use_rslora="false"), "use_rslora"),
    "fan-in-fan-out-string": (dict(fan_in_fan_out="false"), "fan_in_fan_out"),
    "dora-string": (dict(use_dora="false"), "use_dora"),
    "dropout-range": (dict(lora_dropout=1.5), "lora_dropout"),
    "dropout-string": (dict(lora_dropout="0.1"), "lora_dropout"),
    "bias-value": (dict(bias="some"), "bias"),
    "targets-not-strings": (dict(target_modules=["q_proj", 3]), "target_modules"),
    "exclude-type": (dict(exclude_modules=5), "exclude_modules"),
    "modules-to-save-string": (dict(modules_to_save="lm_head"), "modules_to_save"),
    "task-type": (dict(task_type=3), "task_type"),
    "init-type": (dict(init_lora_weights=1.5), "init_lora_weights"),
}


@pytest.mark.parametrize("adapted", [False, True], ids=["fresh", "adapted"])
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_config_values_leave_the_model_unchanged(case: str, adapted: bool, tmp_path: Path) -> None:
    save_adapter(_ours(*OURS["llama-qv"]), tmp_path)
    changes, field = BAD_VALUES[case]
    _edit_config(tmp_path, **changes)
    model = _ours(*OURS["llama-qv"]) if adapted else _llama()
    if adapted:
        merge_adapters(model)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"adapter_config\.json: {field}\b"):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


def test_good_config_values_still_load(tmp_path: Path) -> None:
    """The checks refuse only bad values: integral floats for alpha, regex pattern keys, and a
    different lora_alpha/use_rslora for an adapted model are fine."""
    source = _ours(*OURS["llama-qv"])
    save_adapter(source, tmp_path)
    reference = _logits(source)
    _edit_config(tmp_path, lora_alpha=8.0, alpha_pattern={r"layers\.[01]\.self_attn\.v_proj": 8.0},
                 rank_pattern={"q_proj|v_proj": 4})
    torch.testing.assert_close(_logits(load_adapter(_llama(), tmp_path)), reference, atol=1e-6, rtol=0)
    _edit_config(tmp_path, lora_alpha=16, alpha_pattern={}, use_rslora=True)
    model = load_adapter(_ours(*OURS["llama-qv"]), tmp_path)
    assert all((m.alpha, m.use_rslora, m.scaling) == (16, True, 8.0) for _, m in lora_layers(model))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_adapter(_llama(), tmp_path / "nowhere")
    save_adapter(_ours(*OURS["llama-qv"]), tmp_path / "a")
    (tmp_path / "a" / WEIGHTS).rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors.*pickle"):
        load_adapter(_llama(), tmp_path / "a")
    (tmp_path / "a" / CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG):
        load_adapter(_llama(), tmp_path / "a")
    save_adapter(_ours(*OURS["llama-qv"]), tmp_path / "b")
    (tmp_path / "b" / CONFIG).write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(_llama(), tmp_path / "b")
    (tmp_path / "b" / CONFIG).write_text('["LORA"]')
    with pytest.raises(ValueError, match="JSON object"):
        load_adapter(_llama(), tmp_path / "b")


def test_bad_state_dicts_leave_the_model_unchanged() -> None:
    model = _ours(*OURS["llama-qv"])
    good = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    name = "model.layers.0.self_attn.q_proj.lora_B"
    bad = {
        "missing": ({k: v for k, v in good.items() if k != name}, "1 missing"),
        "unexpected": ({**good, "model.extra": torch.ones(1)}, r"1 unexpected \(model\.extra"),
        "mis-shaped": ({**good, name: torch.ones(16, 3)}, r"q_proj\.lora_B: shape \(16, 3\)"),
        "nan": ({**good, name: torch.full((16, 4), float("nan"))},
                r"1 non-finite \(.*q_proj\.lora_B: 64 NaN"),
    }
    snap = _snapshot(model)
    for state, message in bad.values():
        with pytest.raises(ValueError, match=message):
            load_adapter_state_dict(model, state)
        _assert_unchanged(model, snap)
    load_adapter_state_dict(model, bad["missing"][0], strict=False)
    with pytest.raises(ValueError, match="inject the adapter first"):
        load_adapter_state_dict(_llama(), good)


def test_values_that_overflow_the_model_dtype_are_refused() -> None:
    model = _ours(*OURS["llama-qv"]).to(torch.float16)
    state = {k: v.float() for k, v in adapter_state_dict(model).items()}
    name = "model.layers.1.self_attn.v_proj.lora_B"
    state[name] = state[name].clone().fill_(1e6)  # finite in fp32, inf once cast to fp16
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"non-finite \({name}: .*torch\.float16"):
        load_adapter_state_dict(model, state)
    _assert_unchanged(model, snap)


def test_unsavable_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="carries no adapter to save"):
        save_adapter(_llama(), tmp_path)
    model = _llama()
    apply_lora(model, r=2, target_modules=["q_proj"], use_rslora=True)
    apply_lora(model, r=2, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="use_rslora"):
        save_adapter(model, tmp_path)


# ---------------------------------------------------------- (e) no pickle, (f) adapter-only


def test_files_are_safetensors_and_json(tmp_path: Path) -> None:
    model = _ours(*OURS["llama-patterns-rslora-lm_head"])
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]
    raw = (tmp_path / WEIGHTS).read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a pickle nor a torch zip archive
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    metadata = header.pop("__metadata__")
    assert sorted(metadata) == ["format", "lightning_peft.adapter_config"] and metadata["format"] == "pt"
    bound = json.loads(metadata["lightning_peft.adapter_config"])  # the fields that decide the reading
    assert (bound["r"], bound["lora_alpha"], bound["modules_to_save"]) == (2, 3, ["lm_head"])
    expected = {"base_model.model.lm_head.weight"} | {
        f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight"
        for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for ab in "AB"}
    assert set(header) == expected
    assert header["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == {
        "dtype": "F32", "shape": [2, 32], "data_offsets": header[
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]["data_offsets"]}
    assert 8 + size + max(h["data_offsets"][1] for h in header.values()) == len(raw)
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["peft_type"] == "LORA"
    assert peft.LoraConfig.from_pretrained(str(tmp_path)).rank_pattern == config["rank_pattern"]


def test_adapter_file_is_small(tmp_path: Path) -> None:
    model = _ours("llama", dict(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path)
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert (tmp_path / WEIGHTS).stat().st_size < 0.15 * full


# --------------------------------------------------- (g) atomic adapter directories


def _sequential() -> nn.Module:
    return nn.Sequential(*[nn.Linear(96, 96) for _ in range(6)])


def _marked(alpha: float) -> nn.Module:
    """An adapter whose weights tell which config they were saved with (lora_B == alpha)."""
    model = apply_lora(_sequential(), r=16, alpha=alpha, target_modules=[str(i) for i in range(6)])
    for _, layer in lora_layers(model):
        layer.lora_B.data.fill_(alpha)
    return model


def _save_until_killed(models: list[nn.Module], directory: Path, rng: random.Random) -> None:
    """Fork a process that saves ``models`` in turn to ``directory``, and SIGKILL it at a random
    moment of a save after its first (it reports each finished save through a pipe)."""
    read, write = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            os.close(read)
            torch.set_num_threads(1)
            for i in itertools.count(1):
                save_adapter(models[i % len(models)], directory)
                os.write(write, b".")
        finally:
            os._exit(1)
    os.close(write)
    try:
        assert os.read(read, 1) == b".", "the saving process died"
        time.sleep(rng.uniform(0.0, time.perf_counter() - start))  # about one save's duration
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    finally:
        os.close(read)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_save_killed_at_random_moments_leaves_a_consistent_directory(tmp_path: Path) -> None:
    """SIGKILL a process while it overwrites an adapter, 20 times at random moments: the directory
    always loads, with the config its weights were saved with, and keeps the user's files."""
    import lightning_peft.io as io

    probe = [tmp_path / "x", tmp_path / "y"]
    for folder in probe:
        folder.mkdir()
    if not io._exchange_directories(*probe):  # each file is still replaced atomically, but a
        pytest.skip("no atomic exchange of directories here")  # torn pair is then refused on load
    for folder in probe:
        folder.rmdir()
    directory = tmp_path / "adapter"
    models = [_marked(alpha) for alpha in (1.0, 2.0, 3.0)]
    save_adapter(models[0], directory)
    (directory / "README.md").write_text("my notes\n")
    rng, seen = random.Random(0), set()
    for _ in range(20):
        _save_until_killed(models, directory, rng)
        loaded = load_adapter(_sequential(), directory)
        for name, layer in lora_layers(loaded):
            assert torch.all(layer.lora_B == layer.alpha), (name, layer.alpha, layer.lora_B[0, 0])
            seen.add(layer.alpha)
        assert (directory / "README.md").read_text() == "my notes\n"
    assert len(seen) > 1  # the killed processes did replace the adapter
    # What a killed save left beside the directory goes with the next save.
    save_adapter(models[0], directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", CONFIG, WEIGHTS]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_overwrite_keeps_other_files_and_uses_normal_modes(tmp_path: Path) -> None:
    first, second = _ours(*OURS["llama-qv"]), _ours(*OURS["llama-patterns-rslora-lm_head"])
    directory = save_adapter(first, tmp_path / "a")
    (directory / "README.md").write_text("model card")
    (directory / "plots").mkdir()
    (directory / "plots" / "loss.csv").write_text("1,2")
    (directory / "latest").symlink_to("README.md")
    save_adapter(second, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", CONFIG, WEIGHTS, "latest", "plots"]
    assert (directory / "README.md").read_text() == "model card"
    assert (directory / "plots" / "loss.csv").read_text() == "1,2"
    assert os.readlink(directory / "latest") == "README.md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing left beside it
    torch.testing.assert_close(_logits(load_adapter(_llama(), directory)), _logits(second), atol=1e-6, rtol=0)
    for name in (CONFIG, WEIGHTS):  # the umask's mode (0644 under umask 022), not 0600
        assert (directory / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name
    assert directory.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_overwrite_where_directories_cannot_be_exchanged(tmp_path: Path, monkeypatch) -> None:
    """Without an atomic exchange of directories (not Linux, or a file system without
    RENAME_EXCHANGE) each file is replaced atomically and the weights' copy of the config
    catches a torn pair."""
    import lightning_peft.io as io

    monkeypatch.setattr(io, "_exchange_directories", lambda a, b: False)
    directory = save_adapter(_ours(*OURS["llama-qv"]), tmp_path / "a")
    (directory / "README.md").write_text("model card")
    second = _ours(*OURS["llama-patterns-rslora-lm_head"])
    save_adapter(second, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", CONFIG, WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    torch.testing.assert_close(_logits(load_adapter(_llama(), directory)), _logits(second), atol=1e-6, rtol=0)
    # A parent directory we may not write to: the files are staged inside the adapter directory.
    mkdir = os.mkdir

    def read_only_parent(name, *args, **kwargs):
        if Path(name).parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(name))
        return mkdir(name, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_parent)
    third = _ours(*OURS["llama-one-layer"])
    save_adapter(third, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", CONFIG, WEIGHTS]
    torch.testing.assert_close(_logits(load_adapter(_llama(), directory)), _logits(third), atol=1e-6, rtol=0)


def test_config_from_another_save_is_refused(tmp_path: Path) -> None:
    """Our weights carry the config they were saved with; a config file that disagrees on a
    field that decides how the weights are read is refused, naming the field. Descriptive fields
    may be edited, and files without that metadata (HF PEFT's) load as before."""
    save_adapter(_ours("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])), tmp_path / "a")
    save_adapter(_ours("llama", dict(r=4, alpha=2, target_modules=["q_proj", "v_proj"])), tmp_path / "b")
    (tmp_path / "a" / CONFIG).write_bytes((tmp_path / "b" / CONFIG).read_bytes())
    model = _llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"lora_alpha is 2 in .*adapter_config\.json but 8 in .*metadata"):
        load_adapter(model, tmp_path / "a")
    _assert_unchanged(model, snap)
    _edit_config(tmp_path / "b", unbind=False, base_model_name_or_path="moved/here", inference_mode=False,
                 lora_dropout=0.1)
    assert lora_layers(load_adapter(_llama(), tmp_path / "b"))[0][1].alpha == 2
    _edit_config(tmp_path / "a")  # drops the metadata: a pair as HF PEFT writes it
    assert lora_layers(load_adapter(_llama(), tmp_path / "a"))[0][1].alpha == 2


def test_config_written_again_by_hf_peft_still_belongs_to_its_weights(tmp_path: Path) -> None:
    """PEFT holds ``target_modules`` (and ``exclude_modules``, IA3's ``feedforward_modules``) as sets:
    a config it writes again (to change ``base_model_name_or_path``, say) lists them in another
    order, which is the same config (it used to be refused as not belonging to the weights)."""
    save_adapter(_ours("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
                 tmp_path)
    written = (tmp_path / CONFIG).read_text()
    config = json.loads(written)
    for order in (sorted(config["target_modules"], reverse=True), sorted(config["target_modules"])[1:] * 2):
        config["target_modules"] = order
        (tmp_path / CONFIG).write_text(json.dumps(config))
        if len(set(order)) == 3:
            assert len(lora_layers(load_adapter(_llama(), tmp_path))) == 6
        else:  # another set of modules is another config
            with pytest.raises(ValueError, match=r"target_modules is .* but .* in the weights' metadata"):
                load_adapter(_llama(), tmp_path)
    (tmp_path / CONFIG).write_text(written)
    peft_config = peft.PeftConfig.from_pretrained(str(tmp_path))
    peft_config.base_model_name_or_path = "moved/here"
    peft_config.target_modules = set(reversed(sorted(peft_config.target_modules)))
    peft_config.save_pretrained(str(tmp_path))
    assert len(lora_layers(load_adapter(_llama(), tmp_path))) == 6


def test_save_to_a_file_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        save_adapter(_ours(*OURS["llama-qv"]), tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# -------------------------------------- (h) modules trained in full with buffers (BatchNorm)


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.bn, self.lin1 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.bn(self.lin0(x))))


def _bn_input(seed: int = 3) -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _update_running_stats(model: nn.Module) -> None:
    model.train()
    for step in range(3):
        model(_bn_input(step) * (step + 2) + step)
    model.eval()


def _bn_stats(bn: nn.Module) -> list[torch.Tensor]:
    return [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def test_batchnorm_statistics_from_hf_peft(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_BatchNormNet(), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["lin0"], modules_to_save=["bn"]))
    _perturb(theirs)
    _update_running_stats(theirs)
    theirs.save_pretrained(tmp_path)
    assert "base_model.model.bn.running_var" in load_file(tmp_path / WEIGHTS)
    model = load_adapter(_BatchNormNet(), tmp_path).eval()
    expected = _bn_stats(theirs.base_model.model.bn.modules_to_save["default"])
    assert int(expected[2]) == 3 and not torch.allclose(expected[0], torch.zeros(6))
    for got, want in zip(_bn_stats(model.bn.modules_to_save), expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    with torch.no_grad():
        torch.testing.assert_close(model(_bn_input()), theirs(_bn_input()), atol=1e-6, rtol=0)


def test_batchnorm_statistics_to_hf_peft_and_back(tmp_path: Path) -> None:
    model = apply_lora(_BatchNormNet(), r=2, alpha=4, target_modules=["lin0"], modules_to_save=["bn"])
    _perturb(model)
    _update_running_stats(model)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(tensors[f"base_model.model.bn.{name}"], getattr(model.bn.modules_to_save, name))
    with torch.no_grad():
        reference = model(_bn_input())
        assert not torch.allclose(reference, _BatchNormNet().eval()(_bn_input()), atol=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(_BatchNormNet(), tmp_path).eval()
        torch.testing.assert_close(theirs(_bn_input()), reference, atol=1e-6, rtol=0)
        loaded = load_adapter(_BatchNormNet(), tmp_path).eval()
        assert torch.equal(loaded(_bn_input()), reference)
    # A count that is not an integer is refused (it would be truncated).
    _edit_file(tmp_path, lambda t: t.update({"base_model.model.bn.num_batches_tracked": torch.tensor(2.5)}))
    fresh = _BatchNormNet()
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match=r"bn\.num_batches_tracked: dtype torch\.float32 .*torch\.int64"):
        load_adapter(fresh, tmp_path)
    _assert_unchanged(fresh, snap)


def test_adapter_state_dict_holds_buffers_of_modules_trained_in_full() -> None:
    model = apply_lora(_BatchNormNet(), r=2, alpha=4, target_modules=["lin0"], modules_to_save=["bn"])
    _perturb(model)
    _update_running_stats(model)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert {"bn.modules_to_save.running_mean", "bn.modules_to_save.num_batches_tracked"} <= set(state)
    fresh = apply_lora(_BatchNormNet(), r=2, alpha=4, target_modules=["lin0"], modules_to_save=["bn"])
    load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(_bn_input()), model(_bn_input()))


def test_adapter_state_dict_of_a_fabric_module_is_keyed_as_its_state_dict(tmp_path: Path) -> None:
    """Fabric's wrapper delegates ``state_dict()`` to the module it wraps (no ``_forward_module.``
    prefix): the adapter state dict uses those names (it used the parameters' prefixed ones, so
    loading it into the plain model was refused), and both directions work."""
    from lightning.fabric import Fabric

    from tests import _tiny

    model = apply_lora(_tiny.llama(), r=2, target_modules=["q_proj", "v_proj"])
    _tiny.randomize_lora(model)
    wrapped = Fabric(accelerator="cpu", devices=1).setup_module(model)
    state = adapter_state_dict(wrapped)
    assert state and set(state) <= set(wrapped.state_dict())
    assert not any("_forward_module" in k for k in state)
    plain = apply_lora(_tiny.llama(), r=2, target_modules=["q_proj", "v_proj"])
    load_adapter_state_dict(plain, state)
    assert all(torch.equal(v, adapter_state_dict(plain)[k]) for k, v in state.items())
    load_adapter_state_dict(wrapped, adapter_state_dict(plain))
    save_adapter(wrapped, tmp_path / "a")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(_tiny.llama(), tmp_path / "a")(ids).logits, model(ids).logits,
                                   rtol=0, atol=0)


def test_a_staging_leftover_with_this_pid_is_an_earlier_processs(tmp_path: Path) -> None:
    """A restarted container's main process gets the same PID as the one killed mid-save: its
    leftover staging directory was never removed (skipped as "ours"). Only the directories this
    process is writing are kept."""
    from lightning_peft import io

    model = apply_lora(_sequential(), r=2, target_modules=["0"])
    target = save_adapter(model, tmp_path / "adapter")
    leftover = tmp_path / f".adapter{io._STAGING}{os.getpid()}-deadbeef"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    in_use = tmp_path / f".adapter{io._STAGING}{os.getpid()}-0ba11e"
    in_use.mkdir()
    io._IN_USE.add(str(in_use))
    try:
        save_adapter(model, target)
    finally:
        io._IN_USE.discard(str(in_use))
    assert not leftover.exists() and in_use.exists()


def test_a_parent_that_cannot_be_written_or_a_mount_stages_inside(tmp_path: Path, monkeypatch) -> None:
    """A read-only parent (EROFS: a writable volume under a read-only root) was an OSError; a
    mount at or inside the directory made the exchange fail (EBUSY) or carry the mount off with
    the old directory and empty it. Both now stage inside the directory and keep its other files."""
    import errno as errno_

    from lightning_peft import io

    model = apply_lora(_sequential(), r=2, target_modules=["0"])
    target = save_adapter(model, tmp_path / "adapter")
    (target / "data").mkdir()
    (target / "data" / "notes.txt").write_text("keep")

    def read_only(path):
        raise OSError(errno_.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(io, "staging_sibling", read_only)
    save_adapter(model, target)
    monkeypatch.undo()
    exchanged = []
    monkeypatch.setattr(io, "_exchange_directories", lambda a, b: exchanged.append(1) or False)
    monkeypatch.setattr(io, "_holds_a_mount", lambda directory: True)
    save_adapter(model, target)
    assert not exchanged  # staged inside: nothing to exchange
    assert (target / "data" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    other = apply_lora(_sequential(), r=2, target_modules=["0"])
    load_adapter(other, target)


def test_holds_a_mount_sees_a_mount_at_or_below_the_directory(tmp_path: Path) -> None:
    import subprocess

    from lightning_peft import io

    (tmp_path / "a" / "b").mkdir(parents=True)
    assert not io._holds_a_mount(tmp_path / "a")
    mount = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp_path / "a" / "b")], capture_output=True)
    if mount.returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        assert io._holds_a_mount(tmp_path / "a") and io._holds_a_mount(tmp_path / "a" / "b")
    finally:
        subprocess.run(["umount", str(tmp_path / "a" / "b")], check=True)


def test_load_adapter_state_dict_runs_the_methods_checks(tmp_path: Path) -> None:
    """FishMask's indices out of range were copied (the forward then failed), and into a merged
    model the re-merge raised an IndexError half way; now a ValueError before anything changes."""
    from lightning_peft import apply_fishmask
    from tests import _tiny

    model = _tiny.llama()
    apply_fishmask(model, fisher={n: torch.rand(p.shape) for n, p in model.named_parameters()}, keep=0.01)
    state = adapter_state_dict(model)
    key = next(k for k in state if "fishmask_indices" in k)
    bad = {**state, key: state[key].clone().fill_(10**6)}
    for merged in (False, True):
        if merged:
            merge_adapters(model)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        with pytest.raises(ValueError, match="state_dict: .*indices must lie in"):
            load_adapter_state_dict(model, bad)
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize(("apply", "field", "raw"), [
    ("adapters", "activation", '["relu"]'),
    ("prompt_tuning", "prompt_tuning_init", '["RANDOM"]'),
    ("lora", "lora_alpha", "1" + "0" * 400),
    ("lora", "r", "1" + "0" * 30),
])
def test_config_values_of_an_unforeseen_kind_are_malformed_config_errors(apply, field, raw, tmp_path):
    """A list where a name goes or a 400-digit number raised TypeError/OverflowError from deep
    inside (``lightning-peft generate`` then showed a traceback); now the ValueError of a
    malformed config, naming the file, and the model is unchanged."""
    import lightning_peft
    from tests import _tiny

    kwargs = {"adapters": {"bottleneck": 4}, "prompt_tuning": {"num_virtual_tokens": 4},
              "lora": {"r": 4, "target_modules": ["q_proj"]}}[apply]
    adapted = getattr(lightning_peft, f"apply_{apply}")(_tiny.llama(), **kwargs)
    directory = save_adapter(adapted, tmp_path / "a")
    config = json.loads((directory / "adapter_config.json").read_text())
    config[field] = "@@"
    (directory / "adapter_config.json").write_text(json.dumps(config).replace('"@@"', raw))
    weights = directory / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # no recorded config to compare
    model = _tiny.llama()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(model, directory)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
