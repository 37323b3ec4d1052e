"""BitFit (arXiv 2106.10199): only biases (and the named modules) train; adapter files hold only
them; models without biases get zero biases on request, and start unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lightning_peft._base import (
    TRAIN_BIAS_ATTR,
    ModulesToSave,
    adapter_named_parameters,
    trainable_parameters,
)
from lightning_peft.methods import apply_peft, get_method, method_for_config, method_for_peft_type
from lightning_peft.methods.bitfit import (
    BITFIT_ATTR,
    METHOD,
    BitFitConfig,
    apply_bitfit,
    bitfit_biases,
    bitfit_from_json,
    bitfit_to_json,
    bitfit_update_from_json,
)
from tests import _tiny

WHERE = "adapter/adapter_config.json"


def _bert_inputs(seed: int = 0, batch: int = 4, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 60, (batch, seq), generator=g), torch.randint(0, 3, (batch,), generator=g)


def _ids(seed: int = 0, batch: int = 3, seq: int = 10, vocab: int = 96):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(ids).logits
    model.train(was)
    return out


def _train(model: nn.Module, batches, steps: int = 3, lr: float = 1e-2) -> None:
    """AdamW over every parameter, as a LightningModule's ``self.parameters()`` would give it."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad()
        batches(step).loss.backward()
        opt.step()
    model.eval()


def _owned(model: nn.Module) -> set[str]:
    return {n for n, _ in adapter_named_parameters(model)}


def _snapshot(model: nn.Module) -> tuple:
    """Everything a load could change: tensors, requires_grad, module structure, marks."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [(n, type(m), m.__dict__.get(BITFIT_ATTR), m.__dict__.get(TRAIN_BIAS_ATTR))
             for n, m in model.named_modules()])


def _assert_unchanged(model: nn.Module, snap: tuple) -> None:
    state, grads, modules = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == grads
    assert [(n, type(m), m.__dict__.get(BITFIT_ATTR), m.__dict__.get(TRAIN_BIAS_ATTR))
            for n, m in model.named_modules()] == modules


def _bert_biases(model: nn.Module, skip: str = "classifier") -> set[str]:
    return {n for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith(skip)}


# ---------------------------------------------------------------- config and arguments


@pytest.mark.parametrize(("kwargs", "arg"), [
    ({"target_modules": 3}, "target_modules"),
    ({"target_modules": ""}, "target_modules"),
    ({"target_modules": ["query", ""]}, "target_modules"),
    ({"target_modules": "(query"}, "target_modules"),
    ({"exclude_modules": [1]}, "exclude_modules"),
    ({"exclude_modules": "[a-"}, "exclude_modules"),
    ({"trainable_modules": [""]}, "trainable_modules"),
    ({"trainable_modules": 5}, "trainable_modules"),
    ({"trainable_modules": ["classifier", 2]}, "trainable_modules"),
    ({"add_missing_biases": "yes"}, "add_missing_biases"),
    ({"add_missing_biases": 1}, "add_missing_biases"),
])
def test_bad_config_values_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}"):
        BitFitConfig(**kwargs)
    model = _tiny.bert()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"^{arg}"):
        apply_bitfit(model, **kwargs)
    _assert_unchanged(model, snap)


def test_config_normalises_and_rejects_a_foreign_config():
    cfg = BitFitConfig(target_modules=("query", "value"), trainable_modules="classifier")
    assert cfg.target_modules == ["query", "value"] and cfg.trainable_modules == ["classifier"]
    assert BitFitConfig(trainable_modules=[]).trainable_modules is None
    assert BitFitConfig().to_dict() == {"target_modules": None, "exclude_modules": None,
                                        "trainable_modules": None, "add_missing_biases": False}
    from lightning_peft.methods.lora import LoRAConfig

    with pytest.raises(TypeError, match="BitFitConfig"):
        apply_bitfit(_tiny.bert(), config=LoRAConfig())


@pytest.mark.parametrize(("build", "kwargs", "match"), [
    # Llama has no bias at all: the error says how to get some
    (_tiny.llama, {}, r"LlamaForCausalLM has no bias to train.*add_missing_biases=True"),
    (_tiny.llama, {"target_modules": ["q_proj", "v_proj"]}, r"q_proj.*add_missing_biases=True"),
    (_tiny.llama, {"target_modules": "all-linear"}, r"add_missing_biases=True"),
    # names that match nothing: the error lists the modules that have biases
    (_tiny.bert, {"target_modules": ["query", "qurey"]},
     r"target_modules entry 'qurey' matches no module with a bias.*'query'.*bert\.encoder"),
    (_tiny.bert, {"target_modules": r".*\.nothing"}, r"target_modules='.*nothing' matches no module"),
    (_tiny.bert, {"target_modules": ["attention"]}, r"'attention'.*BertAttention.*no bias of their own"),
    (_tiny.bert, {"target_modules": ["query"], "exclude_modules": ["query"]},
     r"'query' matches no module with a bias \(exclude_modules=\['query'\]\)"),
    (_tiny.llama, {"target_modules": ["norm"], "add_missing_biases": True},
     r"matches no module with a bias.*LlamaRMSNorm"),
    (_tiny.bert, {"trainable_modules": ["clasifier"]},
     r"trainable_modules entry 'clasifier' matches no module"),
    (_tiny.bert, {"target_modules": ["classifier"], "trainable_modules": ["classifier"]},
     r"trainable_modules and target_modules both select \['classifier'\]"),
])
def test_bad_selections_are_refused_before_anything_changes(build, kwargs, match):
    model = build()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        apply_bitfit(model, **kwargs)
    _assert_unchanged(model, snap)


def test_a_norm_without_bias_cannot_be_given_one():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.LayerNorm(6, bias=False), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"not dense nn.Linear/Conv1D.*1 \(LayerNorm\)"):
        apply_bitfit(model, target_modules=["1"], add_missing_biases=True)
    # None: every bias the model has; the bias-less Linear is left alone without add_missing_biases
    apply_bitfit(model)
    assert bitfit_biases(model) == {"2": "existing"} and model[0].bias is None


# ---------------------------------------------------------------- what trains


def test_default_trains_every_bias_layernorm_included_plus_the_head():
    model = _tiny.bert()
    apply_bitfit(model, trainable_modules=["classifier"])
    biases = _bert_biases(model)
    assert any("LayerNorm" in n for n in biases) and "bert.pooler.dense.bias" in biases
    assert _owned(model) == biases | {"classifier.modules_to_save.weight", "classifier.modules_to_save.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == _owned(model)
    assert isinstance(model.classifier, ModulesToSave)
    assert not any(BITFIT_ATTR in m.__dict__ for m in model.classifier.modules())  # no bias marked inside


def test_trainable_parameters_counts_only_biases_and_head():
    model = _tiny.bert()
    total_before = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    biases = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith(".bias") and not n.startswith("classifier"))
    apply_bitfit(model, trainable_modules=["classifier"])
    count = trainable_parameters(model)
    assert count.trainable == biases + head
    assert count.total == total_before + head  # the frozen original head is kept beside its copy
    assert f"trainable params: {biases + head:,d}" in str(count)


def test_name_patterns_select_exactly_the_query_and_intermediate_biases():
    model = _tiny.bert()
    apply_bitfit(model, target_modules=["query", "intermediate.dense"], trainable_modules=["classifier"])
    chosen = {f"bert.encoder.layer.{i}.{m}.bias" for i in range(2)
              for m in ("attention.self.query", "intermediate.dense")}
    head = {"classifier.modules_to_save.weight", "classifier.modules_to_save.bias"}
    assert _owned(model) == chosen | head
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, labels = _bert_inputs()
    _train(model, lambda step: model(ids, labels=labels))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == chosen | head


def test_regex_and_exclude_select_by_name():
    model = _tiny.bert()
    apply_bitfit(model, target_modules=r".*\.layer\.\d+\..*", exclude_modules=["LayerNorm", "key"])
    assert set(bitfit_biases(model)) == {
        f"bert.encoder.layer.{i}.{m}" for i in range(2)
        for m in ("attention.self.query", "attention.self.value", "attention.output.dense",
                  "intermediate.dense", "output.dense")}


@pytest.mark.parametrize("case", ["bert", "llama"])
def test_training_changes_only_what_bitfit_owns(case):
    if case == "bert":
        model = apply_bitfit(_tiny.bert(), trainable_modules=["classifier"])
        ids, labels = _bert_inputs()

        def batches(step):
            return model(ids, labels=labels)
    else:
        model = apply_bitfit(_tiny.llama(), add_missing_biases=True)
        ids = _ids()

        def batches(step):
            return model(ids, labels=ids)
    owned = _owned(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    _train(model, batches)
    for name, param in model.named_parameters():
        if name in owned:
            # BERT's key bias adds the same q·b_k to every score of a row: softmax ignores it, its
            # gradient is (almost exactly) zero, so it may not move
            if not name.endswith("attention.self.key.bias"):
                assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"{name} changed but BitFit does not own it"
            assert not name.endswith(".bias") or name.startswith("classifier.original_module")
    for name, buf in model.named_buffers():
        assert torch.equal(buf, buffers[name]), name
    if case == "llama":
        assert owned == {f"{n}.bias" for n in bitfit_biases(model)}
        assert len(owned) == 14 and all(v == "added" for v in bitfit_biases(model).values())


# ---------------------------------------------------------------- starting point and added biases


@pytest.mark.parametrize(("build", "kwargs"), [
    (_tiny.bert, {"trainable_modules": ["classifier"]}),
    (_tiny.bert, {"target_modules": ["query", "intermediate.dense"]}),
    (_tiny.gpt2, {}),
    (_tiny.llama, {"add_missing_biases": True}),
    (_tiny.llama, {"target_modules": ["q_proj", "down_proj"], "add_missing_biases": True}),
])
def test_fresh_application_gives_the_base_outputs_exactly(build, kwargs):
    model = build()
    ids = _ids(vocab=50) if build is not _tiny.llama else _ids()
    base = _logits(model, ids)
    apply_bitfit(model, **kwargs)
    assert torch.equal(_logits(model, ids), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_added_biases_are_zero_in_the_weights_dtype_and_keep_outputs(dtype):
    model = _tiny.llama().to(dtype)
    ids = _ids()
    base = _logits(model, ids)
    apply_bitfit(model, add_missing_biases=True)
    assert torch.equal(_logits(model, ids), base)
    assert model.lm_head.bias is None  # the output head gets none
    for name in bitfit_biases(model):
        layer = model.get_submodule(name)
        assert isinstance(layer.bias, nn.Parameter) and layer.bias.requires_grad
        assert layer.bias.dtype == dtype and layer.bias.shape == (layer.out_features,)
        assert layer.bias.device == layer.weight.device and not layer.bias.any()
        assert not layer.weight.requires_grad


def test_added_biases_on_the_meta_device():
    with torch.device("meta"):
        model = _tiny.llama()
    apply_bitfit(model, target_modules=["v_proj"], add_missing_biases=True)
    assert model.model.layers[0].self_attn.v_proj.bias.is_meta


def test_applying_twice_is_idempotent():
    model = _tiny.llama()
    ids = _ids()
    apply_bitfit(model, add_missing_biases=True)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.fill_(0.5)
    first = bitfit_to_json(model)
    params = dict(model.named_parameters())
    out = _logits(model, ids)
    apply_bitfit(model, add_missing_biases=True)
    apply_bitfit(model)  # the added biases exist now: no error, still recorded as added
    assert bitfit_to_json(model) == first and dict(model.named_parameters()) == params
    assert all(a is b for a, b in zip(params.values(), dict(model.named_parameters()).values()))
    assert torch.equal(_logits(model, ids), out)
    bert = apply_bitfit(_tiny.bert(), trainable_modules=["classifier"])
    apply_bitfit(bert, trainable_modules=["classifier"])
    assert isinstance(bert.classifier, ModulesToSave)
    assert not isinstance(bert.classifier.modules_to_save, ModulesToSave)


# ---------------------------------------------------------------- registry


def test_registry_entry():
    assert get_method("bitfit") is METHOD and method_for_peft_type("BITFIT") is METHOD
    assert method_for_config(BitFitConfig()) is METHOD and METHOD.config_class is BitFitConfig
    model = _tiny.bert()
    assert not METHOD.detect(model)
    assert apply_peft(model, BitFitConfig(target_modules=["query"])) is model
    assert METHOD.detect(model) and set(bitfit_biases(model)) == {
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)}


def test_lora_trainable_biases_are_not_bitfit():
    from lightning_peft.methods.lora import apply_lora

    model = apply_lora(_tiny.bert(), target_modules=["query"], bias="all")
    assert not METHOD.detect(model)
    with pytest.raises(ValueError, match="no BitFit adapter"):
        bitfit_to_json(model)


# ---------------------------------------------------------------- to_json / from_json


def test_to_json_records_exact_names_added_biases_and_head():
    model = apply_bitfit(_tiny.llama(), target_modules=["q_proj"], add_missing_biases=True)
    assert bitfit_to_json(model) == {
        "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
        "added_biases": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
        "trainable_modules": None}
    bert = apply_bitfit(_tiny.bert(), target_modules=["query"], trainable_modules=["classifier"])
    assert bitfit_to_json(bert) == {
        "target_modules": ["bert.encoder.layer.0.attention.self.query",
                           "bert.encoder.layer.1.attention.self.query"],
        "added_biases": [], "trainable_modules": ["classifier"]}
    json.dumps(bitfit_to_json(bert))


@pytest.mark.parametrize(("build", "kwargs"), [
    (_tiny.bert, {"target_modules": ["query", "intermediate.dense"], "trainable_modules": ["classifier"]}),
    (_tiny.llama, {"target_modules": ["q_proj", "o_proj"], "add_missing_biases": True}),
    (_tiny.gpt2, {"exclude_modules": "transformer.h.1.*"}),
])
def test_from_json_recreates_the_same_adapter_on_a_fresh_model_and_a_meta_copy(build, kwargs):
    trained = apply_bitfit(build(), **kwargs)
    cfg = {"peft_type": "BITFIT", "base_model_name_or_path": None, **bitfit_to_json(trained)}
    fresh = build()
    snap = _snapshot(fresh)
    inject = bitfit_from_json(fresh, cfg, WHERE)
    _assert_unchanged(fresh, snap)  # planning reads the model only
    meta = copy.deepcopy(fresh).to("meta")
    inject(meta)
    expected = {n: tuple(p.shape) for n, p in adapter_named_parameters(trained)}
    assert {n: tuple(p.shape) for n, p in adapter_named_parameters(meta)} == expected
    inject(fresh)
    assert bitfit_to_json(fresh) == bitfit_to_json(trained) == bitfit_to_json(meta)
    assert {n: tuple(p.shape) for n, p in adapter_named_parameters(fresh)} == expected
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(expected)


def _bert_cfg():
    model = apply_bitfit(_tiny.bert(), target_modules=["query"], trainable_modules=["classifier"])
    return {"peft_type": "BITFIT", **bitfit_to_json(model)}


def _llama_cfg():
    model = apply_bitfit(_tiny.llama(), target_modules=["q_proj"], add_missing_biases=True)
    return {"peft_type": "BITFIT", **bitfit_to_json(model)}


Q0 = "bert.encoder.layer.0.attention.self.query"


def _set(**fields):
    return lambda cfg: cfg.update(fields)


def _append(**fields):
    return lambda cfg: [cfg[key].append(name) for key, name in fields.items()]


_TARGETS, _ADDED, _TRAINABLE = "target_modules names modules", "added_biases names modules", \
    "trainable_modules names modules"


@pytest.mark.parametrize(("build", "edit", "match"), [
    (_tiny.bert, lambda c: c.pop("target_modules"), "target_modules is missing"),
    (_tiny.bert, _set(target_modules="query"), "target_modules must be a non-empty list"),
    (_tiny.bert, _set(target_modules=[]), "target_modules must be a non-empty list"),
    (_tiny.bert, _set(target_modules=[Q0, 3]), "target_modules must be a non-empty list"),
    (_tiny.bert, _set(target_modules=[Q0, Q0]), r"target_modules names \[.*\] more than once"),
    (_tiny.bert, _append(target_modules="bert.encoder.layer.7.attention.self.query"),
     rf"{_TARGETS} BertForSequenceClassification does not have.*layer\.7"),
    (_tiny.bert, _append(target_modules="query"), rf"{_TARGETS} .* does not have"),
    (_tiny.bert, _append(target_modules=""), rf"{_TARGETS} .* does not have"),
    (_tiny.bert, _append(target_modules="bert.encoder"), rf"{_TARGETS} that have no bias"),
    (_tiny.bert, _append(target_modules="classifier"), rf"{_TARGETS} inside trainable_modules"),
    (_tiny.bert, _set(added_biases="yes"), "added_biases must be a list"),
    (_tiny.bert, _set(added_biases=True), "added_biases must be a list"),
    (_tiny.bert, _set(added_biases=[Q0]), rf"{_ADDED} that already have a bias"),
    (_tiny.bert, _set(added_biases=["bert.pooler.dense"]), "added_biases names .* not in target_modules"),
    (_tiny.bert, _set(trainable_modules="classifier"), "trainable_modules must be a list"),
    (_tiny.bert, _set(trainable_modules=["clasifier"]), rf"{_TRAINABLE} .* does not have"),
    (_tiny.bert, _set(trainable_modules=["classifier", "bert.pooler", "bert.pooler.dense"]),
     rf"{_TRAINABLE} inside other ones"),
    (_tiny.bert, _set(bias_scale=2.0), r"unknown BitFit config fields \['bias_scale'\]"),
    (_tiny.bert, _set(inference_mode="false"), "inference_mode must be true or false"),
    (_tiny.bert, _set(base_model_name_or_path=3), "base_model_name_or_path must be a string"),
    (_tiny.llama, _set(added_biases=[]), f"{_TARGETS} without a bias that added_biases does not list"),
    (_tiny.llama, _set(added_biases=None), f"{_TARGETS} without a bias"),
    (_tiny.llama, _append(target_modules="model.norm"), f"{_TARGETS} that have no bias"),
    (_tiny.llama, _append(target_modules="model.layers.0.input_layernorm",
                          added_biases="model.layers.0.input_layernorm"), f"{_TARGETS} that have no bias"),
])
def test_from_json_checks_every_field_and_names_it(build, edit, match):
    cfg = _bert_cfg() if build is _tiny.bert else _llama_cfg()
    edit(cfg)
    model = build()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"^{WHERE}: {match}"):
        bitfit_from_json(model, cfg, WHERE)
    _assert_unchanged(model, snap)


def test_update_from_json_accepts_only_the_adapter_the_model_carries():
    cfg = _bert_cfg()
    model = apply_bitfit(_tiny.bert(), target_modules=["query"], trainable_modules=["classifier"])
    snap = _snapshot(model)
    bitfit_update_from_json(model, cfg, WHERE)()
    _assert_unchanged(model, snap)
    other = dict(cfg, target_modules=[Q0])
    with pytest.raises(ValueError, match=rf"^{WHERE}: target_modules is .* the model carries a BitFit"):
        bitfit_update_from_json(model, other, WHERE)
    with pytest.raises(ValueError, match=rf"^{WHERE}: trainable_modules is None"):
        bitfit_update_from_json(model, dict(cfg, trainable_modules=None), WHERE)
    with pytest.raises(ValueError, match=rf"^{WHERE}: added_biases must be a list"):
        bitfit_update_from_json(model, dict(cfg, added_biases=1), WHERE)


# ---------------------------------------------------------------- adapter files (through io)


def _bert_trained():
    model = apply_bitfit(_tiny.bert(), trainable_modules=["classifier"])
    ids, labels = _bert_inputs()
    _train(model, lambda step: model(ids, labels=labels))
    return model


def _llama_trained():
    model = apply_bitfit(_tiny.llama(), add_missing_biases=True)
    ids = _ids()
    _train(model, lambda step: model(ids, labels=ids))
    return model


@pytest.mark.parametrize("case", ["bert", "llama"])
def test_save_then_load_into_a_fresh_model_gives_identical_outputs(case, tmp_path):
    from safetensors.torch import load_file

    from lightning_peft.io import load_adapter, save_adapter

    trained, build = (_bert_trained(), _tiny.bert) if case == "bert" else (_llama_trained(), _tiny.llama)
    ids = _ids(vocab=60)
    save_adapter(trained, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT"
    assert {k: config[k] for k in ("target_modules", "added_biases", "trainable_modules")} == \
        bitfit_to_json(trained)
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    expected = {"base_model.model." + n.replace("modules_to_save.", "") for n in _owned(trained)}
    assert set(tensors) == expected  # only the biases and the head, under the module's own path
    fresh = build()
    assert not torch.equal(_logits(fresh, ids), _logits(trained, ids))
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(_logits(fresh, ids), _logits(trained, ids))
    assert bitfit_to_json(fresh) == bitfit_to_json(trained)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == _owned(trained)
    # into a model that already carries the same BitFit adapter: only the tensors are loaded
    again = apply_bitfit(build(), config=BitFitConfig(
        trainable_modules=["classifier"] if case == "bert" else None, add_missing_biases=case == "llama"))
    load_adapter(again, tmp_path / "adapter")
    assert torch.equal(_logits(again, ids), _logits(trained, ids))


def test_adapter_state_dict_holds_only_biases_and_head():
    from lightning_peft.io import adapter_state_dict, load_adapter_state_dict

    trained = _bert_trained()
    state = adapter_state_dict(trained)
    assert set(state) == _owned(trained)
    fresh = apply_bitfit(_tiny.bert(), trainable_modules=["classifier"])
    load_adapter_state_dict(fresh, state)
    ids = _ids(vocab=60)
    assert torch.equal(_logits(fresh, ids), _logits(trained, ids))


def _edit_config(directory, edit, unbind: bool = False) -> None:
    """Edit ``adapter_config.json``; with ``unbind`` drop the record of the saved config from the
    weights' metadata too, so the loader's field checks (not that record) find the problem."""
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    if unbind:
        _edit_weights(directory, lambda tensors: None, drop_metadata="lightning_peft.adapter_config")


def _edit_weights(directory, edit, drop_metadata: str | None = None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = str(directory / "adapter_model.safetensors")
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
        tensors = {k: file.get_tensor(k) for k in file.keys()}  # noqa: SIM118 (not a dict)
    edit(tensors)
    if drop_metadata is not None:
        assert metadata.pop(drop_metadata, None) is not None
    save_file(tensors, path, metadata=metadata)


_Q = "base_model.model.bert.encoder.layer.0.attention.self.query.bias"
_BAD_FILES = {  # problem: (model, file to spoil, the edit, what the error names)
    "target_modules names a missing module": (
        "bert", "config", _append(target_modules="bert.encoder.layer.5.output.dense"), "target_modules"),
    "added_biases is a string": ("bert", "config", _set(added_biases="yes"), "added_biases"),
    "trainable_modules is a number": ("bert", "config", _set(trainable_modules=3), "trainable_modules"),
    "an unknown field": ("bert", "config", _set(only_query=True), "only_query"),
    "added_biases left out": ("llama", "config", _set(added_biases=[]), "added_biases"),
    "a bias missing": ("bert", "weights", lambda t: t.pop(_Q), "query.bias"),
    "an extra tensor": ("bert", "weights", lambda t: t.update(
        {"base_model.model.bert.embeddings.word_embeddings.weight": torch.zeros(60, 24)}), "word_embeddings"),
    "a bias mis-shaped": ("bert", "weights", lambda t: t.update({_Q: torch.zeros(25)}), "query.bias"),
    "a NaN": ("bert", "weights", lambda t: t[_Q].__setitem__(3, float("nan")), "query.bias"),
    "the head mis-shaped": (
        "bert", "weights", lambda t: t.update({"base_model.model.classifier.weight": torch.zeros(4, 24)}),
        "classifier.weight"),
    "an added bias missing": (
        "llama", "weights", lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.bias"),
        "up_proj.bias"),
}


@pytest.mark.parametrize(("problem", "unbind"), [
    (problem, unbind) for problem, (_, spoiled, _, _) in sorted(_BAD_FILES.items())
    for unbind in ((False, True) if spoiled == "config" else (False,))])
def test_a_bad_file_is_refused_and_the_model_stays_bit_identical(problem, unbind, tmp_path):
    from lightning_peft.io import load_adapter, save_adapter

    case, spoiled, edit, named = _BAD_FILES[problem]
    trained, build = (_bert_trained(), _tiny.bert) if case == "bert" else (_llama_trained(), _tiny.llama)
    save_adapter(trained, tmp_path / "adapter")
    if spoiled == "config":
        _edit_config(tmp_path / "adapter", edit, unbind=unbind)
    else:
        _edit_weights(tmp_path / "adapter", edit)
    fresh = build()
    snap = _snapshot(fresh)
    # unbound: BitFit's own field checks answer, naming the field in adapter_config.json
    where = r"adapter_config\.json: .*" if unbind else ""
    with pytest.raises(ValueError, match=where + named):
        load_adapter(fresh, tmp_path / "adapter")
    _assert_unchanged(fresh, snap)
    assert not METHOD.detect(fresh)


# ---------------------------------------------------------------- Lightning


def test_callback_trains_only_biases(tmp_path):
    from lightning_peft import callbacks
    from tests import _lit

    module = _lit.TinyLM()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = callbacks.BitFitCallback(target_modules=["q_proj", "v_proj"], add_missing_biases=True,
                                        adapter_dir=str(tmp_path / "adapter"))
    assert callback.config == BitFitConfig(target_modules=["q_proj", "v_proj"], add_missing_biases=True)
    _lit.trainer(tmp_path, callbacks=[callback]).fit(module, _lit.loader())
    owned = _owned(module)
    assert owned == {f"model.model.layers.{i}.self_attn.{p}.bias"
                     for i in range(2) for p in ("q_proj", "v_proj")}
    for name, param in module.named_parameters():
        assert (name in owned) != torch.equal(param, before.get(name, torch.zeros_like(param))), name
    # the adapter written when fit ends loads into a fresh model and gives the trained outputs
    from lightning_peft.io import load_adapter

    fresh = load_adapter(_tiny.llama(), tmp_path / "adapter")
    ids = _ids()
    assert torch.equal(_logits(fresh, ids), _logits(module.model, ids))


def test_callback_checkpoint_holds_only_biases_and_resumes(tmp_path):
    from lightning_peft import callbacks
    from tests import _lit

    def callback():
        return callbacks.BitFitCallback(add_missing_biases=True)

    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _lit.TinyLM()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="bitfit", every_n_train_steps=3, save_top_k=-1)
    trainer = _lit.trainer(tmp_path, callbacks=[callback(), saver], enable_checkpointing=True)
    trainer.fit(module, _lit.loader())
    state = torch.load(tmp_path / "bitfit.ckpt", weights_only=True)["state_dict"]
    assert set(state) == _owned(module) and len(state) == 14  # the added biases, nothing else
    # resumed at step 3 of 3: no step is taken, so the biases are exactly the checkpoint's
    resumed = _lit.TinyLM()
    _lit.trainer(tmp_path, callbacks=[callback()], max_steps=3).fit(
        resumed, _lit.loader(), ckpt_path=tmp_path / "bitfit.ckpt")
    assert bitfit_to_json(resumed.model) == bitfit_to_json(module.model)
    trained = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert set(trained) == set(state) and all(torch.equal(trained[n], state[n]) for n in state)
    base = dict(_lit.TinyLM().named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in resumed.named_parameters() if n not in state)
    ids = _ids()
    assert torch.equal(_logits(resumed.model, ids), _logits(module.model, ids))


@pytest.mark.parametrize("spec", ["all-linear", None])
def test_bitfit_refuses_layers_another_method_wraps(spec):
    """Every bias (or every linear's) of a model whose k/v/down layers carry IA3: those biases lie
    inside IA3's layers, which BitFit does not reach; it used to leave them out silently. Now an
    error names them and IA3's layer, before the model changes; excluding them works."""
    from lightning_peft.methods.ia3 import IA3Config

    model = apply_peft(_tiny.bert(), IA3Config())
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    with pytest.raises(ValueError, match=rf"target_modules={spec!r} selects .*self\.key.* which carry "
                                         r"another method's layer \(IA3Linear\); BitFit does not reach"):
        apply_peft(model, BitFitConfig(target_modules=spec))
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == grads
    apply_peft(model, BitFitConfig(target_modules=spec, exclude_modules=["key", "value", "output.dense"]))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    assert "bert.encoder.layer.0.attention.self.query.bias" in trained
    assert not any(".key." in n or ".value." in n for n in trained)
