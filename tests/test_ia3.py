"""(IA)³: the op against its formula and HF PEFT, apply_ia3 and its defaults, merge/unmerge,
adapter files both ways with HF PEFT (tiny Llama, GPT-2 Conv1D, BERT, T5), all-or-nothing loads,
and arguments named in their errors."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from kernels.ia3 import ia3_linear, ia3_linear_reference, release_scratch
from lightning_peft import io
from lightning_peft._base import ModulesToSave, restore_adapter_dtypes
from lightning_peft.methods import apply_peft, get_method, method_for_peft_type, methods_in
from lightning_peft.methods.ia3 import (
    IA3_FEEDFORWARD_MODULES,
    IA3_TARGET_MODULES,
    METHOD,
    IA3Config,
    IA3Linear,
    apply_ia3,
    ia3_layers,
)
from tests import _tiny

# ---------------------------------------------------------------- tiny models and inputs


def _t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                num_decoder_layers=2, num_heads=2, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg).eval()


MODELS = {"llama": _tiny.llama, "gpt2": _tiny.gpt2, "bert": _tiny.bert, "t5": _t5}


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 40, (2, 9), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, 40, (2, 5), generator=g)}
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


def _logits(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(kind)).logits


def _randomize(model, seed: int = 1, spread: float = 0.3) -> None:
    """Give every IA3 vector (ours ``ia3_l``, PEFT's ``ia3_l.default``) a value other than ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("ia3_l") or name.endswith("ia3_l.default"):
                param.copy_(1 + spread * torch.randn(param.shape, generator=g))


def _snapshot(model) -> tuple[list[str], dict[str, torch.Tensor]]:
    return ([f"{n}:{type(m).__name__}" for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model, snapshot) -> None:
    structure, state = snapshot
    assert [f"{n}:{type(m).__name__}" for n, m in model.named_modules()] == structure
    now = model.state_dict()
    assert sorted(now) == sorted(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


# ---------------------------------------------------------------- defaults, registry


def test_default_tables_are_peft_tables():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    assert IA3_TARGET_MODULES == TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    assert IA3_FEEDFORWARD_MODULES == TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING


def test_registry_entry():
    assert get_method("ia3") is METHOD and method_for_peft_type("IA3") is METHOD
    assert METHOD.config_class is IA3Config and METHOD.file_prefix == "base_model.model."
    model = _tiny.llama()
    assert METHOD not in methods_in(model)
    assert apply_peft(model, IA3Config()) is model
    assert METHOD in methods_in(model) and METHOD.detect(model)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_defaults_follow_peft_per_architecture(kind):
    ours = apply_ia3(MODELS[kind]())
    theirs = peft.get_peft_model(MODELS[kind](), peft.IA3Config())
    peft_layers = {n.removeprefix("base_model.model."): m.is_feedforward
                   for n, m in theirs.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert {n: m.is_feedforward for n, m in ia3_layers(ours)} == peft_layers
    for name, layer in ia3_layers(ours):
        expected = (1, layer.in_features) if layer.is_feedforward else (layer.out_features, 1)
        assert tuple(layer.ia3_l.shape) == expected, name
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.ia3_l" for n, _ in ia3_layers(ours)}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fresh_ia3_gives_the_base_outputs_exactly(kind):
    base = _logits(MODELS[kind](), kind)
    model = apply_ia3(MODELS[kind]())
    assert torch.equal(_logits(model, kind), base)
    logits = model(**_inputs(kind)).logits  # with autograd recording: the fused op
    assert torch.equal(logits.detach(), base) and logits.requires_grad


def test_applying_twice_is_harmless_and_conflicts_are_named():
    model = apply_ia3(_tiny.llama())
    layers = {n: m.ia3_l for n, m in ia3_layers(model)}
    apply_ia3(model)
    assert {n: m.ia3_l for n, m in ia3_layers(model)} == layers  # same Parameter objects
    with pytest.raises(ValueError, match="feedforward_modules"):
        apply_ia3(model, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=[])
    from lightning_peft import apply_lora

    lora = apply_lora(_tiny.llama(), target_modules=["k_proj"])
    with pytest.raises(ValueError, match="LoRALinear"):
        apply_ia3(lora, target_modules=["k_proj"], feedforward_modules=[])


def test_modules_to_save_and_explicit_targets():
    model = apply_ia3(_tiny.bert(), modules_to_save=["classifier"])
    assert isinstance(model.classifier, ModulesToSave)
    assert model.classifier.modules_to_save.weight.requires_grad
    assert not model.classifier.original_module.weight.requires_grad
    model = apply_ia3(_tiny.llama(), target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"])
    kinds = {n.rsplit(".", 1)[-1]: m.is_feedforward for n, m in ia3_layers(model)}
    assert kinds == {"q_proj": False, "up_proj": True}
    # a given target list with the model type's default feedforward_modules (down_proj: not here)
    model = apply_ia3(_tiny.llama(), target_modules=["q_proj"])
    assert not any(m.is_feedforward for _, m in ia3_layers(model))
    # regex forms, matched against the full name as HF PEFT does
    model = apply_ia3(_tiny.llama(), target_modules=r".*\.(k_proj|gate_proj)",
                      feedforward_modules=r".*gate_proj")
    assert {n.rsplit(".", 1)[-1]: m.is_feedforward for n, m in ia3_layers(model)} == {
        "k_proj": False, "gate_proj": True}


# ---------------------------------------------------------------- the op and the layer


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_matches_formula_float64(conv1d, feedforward):
    torch.manual_seed(0)
    base = (Conv1D(23, 37) if conv1d else nn.Linear(37, 23)).double()
    nn.init.normal_(base.bias)
    w = base.weight.t() if conv1d else base.weight                        # (out, in)
    layer = IA3Linear(base, is_feedforward=feedforward)
    assert layer.ia3_l.dtype == torch.float64 and layer.fan_in_fan_out == conv1d
    nn.init.normal_(layer.ia3_l)
    x = torch.randn(3, 11, 37, dtype=torch.float64)
    l = layer.ia3_l.reshape(-1)
    expected = (x * l) @ w.t() + base.bias if feedforward else (x @ w.t() + base.bias) * l
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    assert layer.base_layer is base and layer.weight.data_ptr() == base.weight.data_ptr()


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_op_gradients_match_autograd_reference(feedforward, train_base, dtype):
    torch.manual_seed(0)
    w = torch.randn(13, 17, dtype=dtype, requires_grad=train_base)
    b = torch.randn(13, dtype=dtype, requires_grad=train_base)
    l = torch.randn((1, 17) if feedforward else (13, 1), dtype=dtype, requires_grad=True)
    x = torch.randn(4, 300, 17, dtype=dtype, requires_grad=True)  # several row blocks for dl
    g = torch.randn(4, 300, 13, dtype=dtype)
    wrt = [x, l] + ([w, b] if train_base else [])
    results = []
    for op in (ia3_linear, ia3_linear_reference):
        y = op(x, w, l, b, feedforward=feedforward)
        results.append((y, torch.autograd.grad(y, wrt, g)))
    (y, grads), (y_ref, grads_ref) = results
    assert torch.equal(y, y_ref)  # the same products in the same order
    tol = {torch.float32: {"rtol": 1e-5, "atol": 1e-4}, torch.float64: {"rtol": 1e-12, "atol": 1e-10},
           torch.bfloat16: {"rtol": 2e-2, "atol": 2e-1}}[dtype]
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref, **tol)
    if dtype == torch.float64:
        xs = x[:1, :5].detach().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x_, l_, w_, b_: ia3_linear(x_, w_, l_, b_, feedforward=feedforward),
            (xs, l.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()))
    release_scratch()


@pytest.mark.parametrize("feedforward", [False, True])
def test_op_backward_twice_with_retained_graph(feedforward):
    """The backward pass reuses the op's own saved output for dY ⊙ l only when the graph is not
    kept: a second backward through a retained graph (and create_graph) sees the same values."""
    torch.manual_seed(0)
    w, b = torch.randn(8, 6), torch.randn(8)
    l = torch.randn((1, 6) if feedforward else (8, 1), requires_grad=True)
    x = torch.randn(3, 40, 6, requires_grad=True)
    g = torch.randn(3, 40, 8)
    y = ia3_linear(x, w, l, b, feedforward=feedforward)
    first = torch.autograd.grad(y, (x, l), g, retain_graph=True)
    second = torch.autograd.grad(y, (x, l), g, create_graph=True)
    third = torch.autograd.grad(y, (x, l), g)
    ref = torch.autograd.grad(ia3_linear_reference(x, w, l, b, feedforward=feedforward), (x, l), g)
    for grads in (first, second, third):
        torch.testing.assert_close(grads, ref)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("train_l", [False, True])
@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_output_can_be_edited_in_place(feedforward, train_l, conv1d):
    """Models edit layer outputs in place (Falcon's ``mlp_output += attention_output``): the
    output is no view made inside the autograd Function, and nothing backward needs changes."""
    torch.manual_seed(0)
    base = Conv1D(8, 6) if conv1d else nn.Linear(6, 8)
    layer = IA3Linear(base, is_feedforward=feedforward)
    nn.init.normal_(layer.ia3_l)
    layer.ia3_l.requires_grad_(train_l)
    x = torch.randn(2, 5, 6, requires_grad=True)
    y = layer(x)
    y += 1.0
    y.pow(2).sum().backward()
    grads = (x.grad, layer.ia3_l.grad)
    x.grad = layer.ia3_l.grad = None
    ref = ia3_linear_reference(x, layer.weight, layer.ia3_l, base.bias, feedforward=feedforward) + 1.0
    ref.pow(2).sum().backward()
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(grads, (x.grad, layer.ia3_l.grad))


@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_compiles_without_graph_breaks(feedforward):
    torch.manual_seed(0)
    layer = IA3Linear(nn.Linear(16, 8), is_feedforward=feedforward)
    nn.init.normal_(layer.ia3_l)
    x = torch.randn(4, 16, requires_grad=True)
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    y = torch.compile(layer, backend="aot_eager")(x)
    y.pow(2).sum().backward()
    grads = x.grad, layer.ia3_l.grad
    x.grad = layer.ia3_l.grad = None
    ref = ia3_linear_reference(x, layer.weight, layer.ia3_l, layer.bias, feedforward=feedforward)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(grads, (x.grad, layer.ia3_l.grad))


def test_op_scratch_is_per_thread(monkeypatch):
    """Threads running the op at once each get their own scratch buffer (and requests over the
    limit a fresh tensor)."""
    import threading

    import kernels.ia3 as op

    monkeypatch.setattr(op, "SCRATCH_LIMIT", 20 * 48 * 4)  # some calls below go over it
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for step in range(20):
                rows = 5 + (seed * 7 + step) % 30
                w = torch.randn(40, 48, generator=g)
                l = torch.randn(1, 48, generator=g, requires_grad=True)
                x = torch.randn(rows, 48, generator=g, requires_grad=True)
                got = torch.autograd.grad(ia3_linear(x, w, l, feedforward=True).sum(), (x, l))
                ref = torch.autograd.grad(ia3_linear_reference(x, w, l, feedforward=True).sum(), (x, l))
                torch.testing.assert_close(got, ref)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_op_refuses_wrong_shapes_by_name():
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match="ia3_l must have 6 elements"):
        ia3_linear(torch.randn(2, 6), w, torch.ones(8, 1), feedforward=True)
    with pytest.raises(ValueError, match="x has 5 features"):
        ia3_linear(torch.randn(2, 5), w, torch.ones(8, 1))


def test_layer_on_a_4bit_base_runs_and_refuses_to_merge():
    from lightning_peft.methods.qlora import NF4Linear

    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    for feedforward in (False, True):
        layer = IA3Linear(base, is_feedforward=feedforward)
        nn.init.normal_(layer.ia3_l)
        x = torch.randn(3, 64)
        l = layer.ia3_l.reshape(-1)
        expected = base(x * l) if feedforward else base(x) * l
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        with pytest.raises(ValueError, match="4-bit"):
            layer.merge()
        assert not layer.merged


# ---------------------------------------------------------------- HF PEFT agreement


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_forward_and_gradients_match_peft(kind):
    ours = apply_ia3(MODELS[kind]())  # eval mode (no dropout), autograd recording
    theirs = peft.get_peft_model(MODELS[kind](), peft.IA3Config())
    _randomize(ours)
    _randomize(theirs)
    losses = []
    for model in (ours, theirs):
        logits = model(**_inputs(kind)).logits
        loss = logits.float().pow(2).mean()
        loss.backward()
        losses.append((logits, {n.removeprefix("base_model.model.").removesuffix(".default"): p.grad
                                 for n, p in model.named_parameters() if p.requires_grad}))
    (y, grads), (y_peft, grads_peft) = losses
    assert torch.equal(y, y_peft)
    assert sorted(grads) == sorted(grads_peft)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_peft[name], rtol=1e-5, atol=1e-6)


def test_half_precision_base_keeps_fp32_vectors_and_matches_peft():
    ours = apply_ia3(_tiny.llama().to(torch.bfloat16))
    theirs = peft.get_peft_model(_tiny.llama().to(torch.bfloat16), peft.IA3Config())
    assert all(m.ia3_l.dtype == torch.float32 for _, m in ia3_layers(ours))
    _randomize(ours)
    _randomize(theirs)
    assert torch.equal(_logits(ours, "llama"), _logits(theirs, "llama"))
    ours.to(torch.bfloat16)  # Lightning's "bf16-true" cast of the whole model, then put back
    params = {n: m.ia3_l for n, m in ia3_layers(ours)}
    assert restore_adapter_dtypes(ours) == len(params)
    assert all(m.ia3_l is params[n] and m.ia3_l.dtype == torch.float32 for n, m in ia3_layers(ours))
    # under autocast (bf16-mixed) as well
    ours, theirs = apply_ia3(_tiny.llama()), peft.get_peft_model(_tiny.llama(), peft.IA3Config())
    _randomize(ours)
    _randomize(theirs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(_logits(ours, "llama"), _logits(theirs, "llama"))


# ---------------------------------------------------------------- files, both ways with HF PEFT


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_our_files_load_in_peft_with_identical_logits(kind, tmp_path):
    ours = apply_ia3(MODELS[kind]())
    _randomize(ours)
    io.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert config["fan_in_fan_out"] is (kind == "gpt2")
    assert config["init_ia3_weights"] is True and config["exclude_modules"] is None
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(f"base_model.model.{n}.ia3_l" for n, _ in ia3_layers(ours))
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](), str(tmp_path))
    assert torch.equal(_logits(theirs, kind), _logits(ours, kind))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_peft_files_load_here_with_identical_logits(kind, tmp_path):
    theirs = peft.get_peft_model(MODELS[kind](), peft.IA3Config())
    _randomize(theirs)
    theirs.save_pretrained(str(tmp_path))
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = io.load_adapter(MODELS[kind](), tmp_path)
    assert torch.equal(_logits(ours, kind), _logits(theirs, kind))
    assert {n for n, _ in ia3_layers(ours)} == {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.ia3.IA3Layer)}
    # our own save of it describes the same adapter with the fields PEFT writes
    io.save_adapter(ours, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert set(peft_config) - set(config) <= {"auto_mapping", "peft_version"}
    for key in ("peft_type", "fan_in_fan_out", "init_ia3_weights", "exclude_modules", "modules_to_save"):
        assert config[key] == peft_config[key], key


def test_modules_to_save_travel_both_ways(tmp_path):
    ours = apply_ia3(_tiny.bert(), modules_to_save=["classifier"])
    _randomize(ours)
    with torch.no_grad():
        ours.classifier.modules_to_save.weight.mul_(3)
    io.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_tiny.bert(), str(tmp_path / "ours"))
    assert torch.equal(_logits(theirs, "bert"), _logits(ours, "bert"))
    again = io.load_adapter(_tiny.bert(), tmp_path / "ours")
    assert isinstance(again.classifier, ModulesToSave)
    assert torch.equal(_logits(again, "bert"), _logits(ours, "bert"))

    theirs = peft.get_peft_model(_tiny.bert(), peft.IA3Config(task_type="SEQ_CLS"))
    _randomize(theirs)
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.mul_(3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    loaded = io.load_adapter(_tiny.bert(), tmp_path / "peft")
    assert torch.equal(_logits(loaded, "bert"), _logits(theirs, "bert"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_then_load_into_a_fresh_model_gives_identical_outputs(kind, tmp_path):
    model = apply_ia3(MODELS[kind]())
    _randomize(model)
    io.save_adapter(model, tmp_path)
    fresh = io.load_adapter(MODELS[kind](), tmp_path)
    assert torch.equal(_logits(fresh, kind), _logits(model, kind))
    # into a model that already carries IA3 (other values): the vectors are replaced
    other = apply_ia3(MODELS[kind]())
    _randomize(other, seed=5)
    io.load_adapter(other, tmp_path)
    assert torch.equal(_logits(other, kind), _logits(model, kind))
    assert all(m.ia3_l.requires_grad for _, m in ia3_layers(other))


# ---------------------------------------------------------------- all-or-nothing loads


BAD_FIELDS = [
    ("target_modules", 5, "target_modules"),
    ("target_modules", [], "target_modules"),
    ("target_modules", "(", "target_modules"),
    ("target_modules", ["no_such_module"], "target_modules"),
    ("feedforward_modules", {"down_proj": 1}, "feedforward_modules"),
    ("feedforward_modules", ["gate_proj"], "feedforward_modules"),
    ("exclude_modules", "[", "exclude_modules"),
    ("fan_in_fan_out", "false", "fan_in_fan_out"),
    ("init_ia3_weights", 1, "init_ia3_weights"),
    ("inference_mode", "yes", "inference_mode"),
    ("modules_to_save", "lm_head", "modules_to_save"),
    ("task_type", 3, "task_type"),
]


def _saved_adapter(tmp_path):
    model = apply_ia3(_tiny.llama())
    _randomize(model)
    io.save_adapter(model, tmp_path)
    return model


def _edit_config(tmp_path, key, value):
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("carries_ia3", [False, True])
@pytest.mark.parametrize(("key", "value", "named"), BAD_FIELDS)
def test_bad_config_fields_are_refused_by_name_and_change_nothing(tmp_path, key, value, named, carries_ia3):
    _saved_adapter(tmp_path)
    _edit_config(tmp_path, key, value)
    target = _tiny.llama()
    if carries_ia3:
        apply_ia3(target)
        _randomize(target, seed=9)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=named):
        io.load_adapter(target, tmp_path)
    _assert_unchanged(target, before)


def _edit_tensors(tmp_path, edit):
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _first_key(tensors, part):
    return sorted(k for k in tensors if part in k)[0]


def _transpose(tensors, part):
    key = _first_key(tensors, part)
    tensors[key] = tensors[key].t().contiguous()


TENSOR_EDITS = {
    "wrong shape": lambda t: _transpose(t, "k_proj"),  # (1, 16) for a (16, 1) output vector
    "wrong length": lambda t: t.__setitem__(_first_key(t, "down_proj"), torch.ones(1, 7)),
    "NaN": lambda t: t[_first_key(t, "v_proj")].__setitem__((0, 0), math.nan),
    "inf": lambda t: t[_first_key(t, "down_proj")].__setitem__((0, 1), math.inf),
    "missing": lambda t: t.pop(_first_key(t, "v_proj")),
    "unexpected": lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.ia3_l",
                                          torch.ones(32, 1)),
}


@pytest.mark.parametrize("carries_ia3", [False, True])
@pytest.mark.parametrize("edit", sorted(TENSOR_EDITS))
def test_bad_tensors_are_refused_and_change_nothing(tmp_path, edit, carries_ia3):
    _saved_adapter(tmp_path)
    _edit_tensors(tmp_path, TENSOR_EDITS[edit])
    target = _tiny.llama()
    if carries_ia3:
        apply_ia3(target)
        _randomize(target, seed=9)
    before = _snapshot(target)
    with pytest.raises(ValueError):
        io.load_adapter(target, tmp_path)
    _assert_unchanged(target, before)


def test_a_file_describing_other_layers_is_refused_on_a_model_with_ia3(tmp_path):
    _saved_adapter(tmp_path)
    target = apply_ia3(_tiny.llama(), target_modules=["k_proj", "v_proj"], feedforward_modules=[])
    before = _snapshot(target)
    with pytest.raises(ValueError, match="target_modules"):
        io.load_adapter(target, tmp_path)
    _assert_unchanged(target, before)


# ---------------------------------------------------------------- training, merging


def test_training_changes_only_the_vectors():
    torch.manual_seed(0)
    model = apply_ia3(_tiny.llama(), modules_to_save=["lm_head"]).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    owned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert owned == {f"{n}.ia3_l" for n, _ in ia3_layers(model)} | {"lm_head.modules_to_save.weight"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = _inputs("llama")["input_ids"]
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in owned:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    for name, buf in model.named_buffers():
        assert torch.equal(buf, buffers[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("feedforward", [False, True])
def test_merge_unmerge_exact_over_cycles(dtype, conv1d, feedforward):
    torch.manual_seed(0)
    base = (Conv1D(48, 64) if conv1d else nn.Linear(64, 48)).to(dtype)
    nn.init.normal_(base.bias)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = IA3Linear(base, is_feedforward=feedforward)
    x = torch.randn(5, 64).to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    for cycle in range(4):
        with torch.no_grad():
            layer.ia3_l.copy_(1 + 0.5 * torch.randn(layer.ia3_l.shape))
            layer.ia3_l.view(-1)[cycle] = 0.0 if cycle % 2 else 1e-30  # zero and tiny entries
        y = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x).float(), y.float(), rtol=tol, atol=tol)
        layer.unmerge()
        assert not layer.merged
        assert torch.equal(base.weight, weight) and torch.equal(base.bias, bias)
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_adapters_on_a_model_and_back_bit_for_bit(kind):
    from lightning_peft import merge_adapters, unmerge_adapters

    model = apply_ia3(MODELS[kind]())
    _randomize(model)
    before = _snapshot(model)
    logits = _logits(model, kind)
    for _ in range(3):
        merge_adapters(model)
        assert all(m.merged for _, m in ia3_layers(model))
        torch.testing.assert_close(_logits(model, kind), logits, rtol=1e-4, atol=1e-5)
        unmerge_adapters(model)
        _assert_unchanged(model, before)
        assert torch.equal(_logits(model, kind), logits)


def test_merge_matches_peft_and_casts_of_a_merged_layer_unmerge_exactly():
    torch.manual_seed(0)
    for feedforward in (False, True):
        base = nn.Linear(32, 16)
        ours = IA3Linear(base, is_feedforward=feedforward)
        nn.init.normal_(ours.ia3_l)
        theirs = peft.tuners.ia3.Linear(nn.Linear(32, 16), "default", peft.IA3Config(),
                                        is_feedforward=feedforward)
        with torch.no_grad():
            theirs.base_layer.load_state_dict(base.state_dict())
            theirs.ia3_l["default"].copy_(ours.ia3_l)
        ours.merge()
        theirs.merge()
        assert torch.equal(base.weight, theirs.base_layer.weight)
        assert torch.equal(base.bias, theirs.base_layer.bias)
        ours.unmerge()
    base = nn.Linear(32, 16)
    original = base.weight.detach().clone()
    layer = IA3Linear(base)
    nn.init.normal_(layer.ia3_l)
    layer.merge()
    layer.to(torch.float64)
    assert layer.merged and layer.ia3_l.dtype == torch.float64
    layer.unmerge()
    assert torch.equal(base.weight, original.double())
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


# ---------------------------------------------------------------- arguments named in errors


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"target_modules": 5}, "target_modules"),
    ({"target_modules": ""}, "target_modules"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": "("}, "target_modules"),
    ({"exclude_modules": [""]}, "exclude_modules"),
    ({"exclude_modules": "*"}, "exclude_modules"),
    ({"feedforward_modules": 3}, "feedforward_modules"),
    ({"feedforward_modules": ""}, "feedforward_modules"),
    ({"feedforward_modules": [""]}, "feedforward_modules"),
    ({"feedforward_modules": "all-linear"}, "feedforward_modules"),
    ({"feedforward_modules": "(?"}, "feedforward_modules"),
    ({"target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]}, "feedforward_modules"),
    ({"modules_to_save": [1]}, "modules_to_save"),
    ({"modules_to_save": 3}, "modules_to_save"),
    ({"init_ia3_weights": "yes"}, "init_ia3_weights"),
    ({"autocast_adapter_dtype": 1}, "autocast_adapter_dtype"),
])
def test_bad_config_arguments_are_named(kwargs, named):
    with pytest.raises(ValueError, match=named):
        IA3Config(**kwargs)
    model = _tiny.llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=named):
        apply_ia3(model, **kwargs)
    _assert_unchanged(model, before)


@pytest.mark.parametrize(("model", "kwargs", "error", "named"), [
    ("llama", {"target_modules": ["no_such"]}, ValueError, "target_modules"),
    ("llama", {"target_modules": ["embed_tokens"]}, ValueError, "target_modules"),
    ("llama", {"exclude_modules": r".*"}, ValueError, "exclude_modules"),
    ("llama", {"feedforward_modules": ["gate_proj"]}, ValueError, "feedforward_modules"),
    ("llama", {"modules_to_save": ["no_such"]}, ValueError, "modules_to_save"),
    ("llama", {"target_modules": ["lm_head", "k_proj"], "feedforward_modules": [],
               "modules_to_save": ["lm_head"]}, ValueError, "modules_to_save"),
    ("plain", {}, ValueError, "target_modules"),
    ("plain", {"target_modules": ["0"]}, ValueError, "feedforward_modules"),
    ("llama", {"config": peft.LoraConfig()}, TypeError, "config"),
    ("llama", {"config": IA3Config(), "target_modules": ["k_proj"]}, ValueError, "config"),
])
def test_bad_apply_arguments_are_named_and_change_nothing(model, kwargs, error, named):
    model = _tiny.llama() if model == "llama" else nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before = _snapshot(model)
    with pytest.raises(error, match=named):
        apply_ia3(model, **kwargs)
    _assert_unchanged(model, before)
    assert not ia3_layers(model)


def test_plain_models_take_explicit_feedforward_modules():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    apply_ia3(model, target_modules=["0", "2"], feedforward_modules=["2"])
    assert [m.is_feedforward for _, m in ia3_layers(model)] == [False, True]
    x = torch.randn(3, 4)
    assert model(x).shape == (3, 4)
