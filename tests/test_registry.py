"""The method registry: lookups, apply_peft, peft_callback, and what every registered method
guarantees through it (a fit changes only what the method owns, files round-trip, a fresh
adapter gives the base outputs, a bad file leaves the model as it was)."""

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch

from lightning_peft import (
    BitFitConfig,
    IA3Config,
    LoRAConfig,
    QLoRAConfig,
    apply_peft,
    load_adapter,
    peft_callback,
    save_adapter,
)
from lightning_peft._base import adapter_named_parameters, has_adapters
from lightning_peft.methods import (
    Method,
    file_method,
    get_method,
    method_for_config,
    method_for_peft_type,
    methods,
    methods_in,
    register,
)
from tests import _lit, _tiny

# AdapterFusion fuses saved adapters: two random bottleneck adapters of the tiny Llama, written by
# the module fixture below
_FUSION_DIRS = [str(Path(tempfile.mkdtemp(prefix="lp-registry-fusion-")) / f"task_{i}") for i in range(2)]

# every registered method, as a callback over the tiny Llama (no biases: BitFit adds them)
CALLBACKS = {
    "adapter": dict(bottleneck=4),
    "adapter_fusion": dict(adapter_dirs=_FUSION_DIRS),
    "lora": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "qlora": dict(r=4, target_modules=["q_proj", "v_proj"], compute_dtype="float32"),
    "ia3": dict(),
    "bitfit": dict(target_modules="all-linear", add_missing_biases=True),
    "trainable_tokens": dict(token_indices=[1, 5, 7, 11, 42, 95]),
    "child_tuning": dict(mode="F", p=0.5, seed=0),
    "fishmask": dict(keep=0.01, fisher_batches=2),
    "adalora": dict(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"]),
    "dylora": dict(r=4, r_min=2, target_modules=["q_proj", "v_proj"]),
    "relora": dict(r=4, target_modules=["q_proj", "v_proj"], reset_every=100, restart_warmup=10),
    "llama_adapter": dict(adapter_len=4),
    "prompt_tuning": dict(num_virtual_tokens=4),
    "p_tuning": dict(num_virtual_tokens=4, encoder_type="LSTM", encoder_hidden_size=8),
    "multitask_prompt_tuning": dict(num_virtual_tokens=4, num_ranks=2),
    "prefix_tuning": dict(num_virtual_tokens=4),
    "intrinsic_dimension": dict(d=64, said=True),
}
CONFIGS = {
    "adapter": get_method("adapter").config_class(bottleneck=4, placement="parallel"),
    "adapter_fusion": get_method("adapter_fusion").config_class(adapter_dirs=_FUSION_DIRS),
    "lora": LoRAConfig(r=4),
    "qlora": QLoRAConfig(r=4, compute_dtype="float32"),
    "ia3": IA3Config(),
    "bitfit": BitFitConfig(target_modules="all-linear", add_missing_biases=True),
    "trainable_tokens": get_method("trainable_tokens").config_class(token_indices=[0, 3, 17, 95]),
    "child_tuning": get_method("child_tuning").config_class(mode="D", p=0.3),
    "fishmask": get_method("fishmask").config_class(keep=0.01),
    "adalora": get_method("adalora").config_class(init_r=4, target_r=2, total_step=10),
    "dylora": get_method("dylora").config_class(r=4),
    "relora": get_method("relora").config_class(r=4, reset_every=100, restart_warmup=10),
    "llama_adapter": get_method("llama_adapter").config_class(adapter_len=4, adapter_layers=1),
    "prompt_tuning": get_method("prompt_tuning").config_class(num_virtual_tokens=4, init="sample_vocab"),
    "p_tuning": get_method("p_tuning").config_class(num_virtual_tokens=4, encoder_hidden_size=8),
    "multitask_prompt_tuning": get_method("multitask_prompt_tuning").config_class(num_virtual_tokens=4,
                                                                                 num_ranks=2),
    "prefix_tuning": get_method("prefix_tuning").config_class(num_virtual_tokens=4, prefix_projection=True),
    "intrinsic_dimension": get_method("intrinsic_dimension").config_class(d=100, said=False),
}
# methods whose fresh adapter is not zero-effect: prompts add virtual positions to the logits
NOT_ZERO_START = {"prompt_tuning", "p_tuning", "multitask_prompt_tuning", "prefix_tuning"}


@pytest.fixture(autouse=True, scope="module")
def _fusion_adapters():
    from lightning_peft import apply_adapters

    for i, directory in enumerate(_FUSION_DIRS):
        model = apply_adapters(_tiny.llama(seed=i), bottleneck=3 + i)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for _, param in adapter_named_parameters(model):
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
        save_adapter(model, directory)


def test_every_registered_method_is_covered_here():
    assert sorted(m.name for m in methods()) == sorted(CALLBACKS) == sorted(CONFIGS)


def test_lookups():
    assert get_method("lora").peft_type == "LORA" and get_method("rslora") is get_method("lora")
    assert method_for_peft_type("IA3") is get_method("ia3")
    assert method_for_peft_type("LORA") is get_method("lora")  # QLoRA writes LoRA files
    assert method_for_config(QLoRAConfig(r=4)) is get_method("qlora")  # the most derived class
    assert method_for_config(LoRAConfig(r=4)) is get_method("lora")
    known = sorted(m.name for m in methods())
    with pytest.raises(ValueError, match=re.escape(f"unknown PEFT method 'dora'; known methods: {known}")):
        get_method("dora")
    types = sorted({m.peft_type for m in methods()})
    with pytest.raises(ValueError, match=re.escape(f"'OFT'; this package loads {types}")):
        method_for_peft_type("OFT")
    with pytest.raises(TypeError, match="config must be one of"):
        method_for_config({"r": 8})


def test_register_refuses_a_taken_name_or_peft_type():
    lora = get_method("lora")
    with pytest.raises(ValueError, match="a method named 'lora' is already registered"):
        register(Method(**{**lora.__dict__, "aliases": ()}, ))
    with pytest.raises(ValueError, match="peft_type 'LORA' is already registered"):
        register(Method(**{**lora.__dict__, "name": "lora2", "aliases": ()}))
    assert [m.name for m in methods()].count("lora") == 1


def test_file_method_needs_exactly_one_method():
    model = _tiny.llama()
    with pytest.raises(ValueError, match="carries no adapter to save"):
        file_method(model)
    apply_peft(model, LoRAConfig(r=4))
    assert file_method(model).name == "lora" and [m.name for m in methods_in(model)] == ["lora"]
    apply_peft(model, BitFitConfig(target_modules=["gate_proj"], add_missing_biases=True))
    with pytest.raises(ValueError, match=r"adapters of several methods \(\['bitfit', 'lora'\]\)"):
        file_method(model)


def test_peft_callback_builds_each_method_callback():
    for name, kwargs in CALLBACKS.items():
        callback = peft_callback(name, **kwargs)
        assert type(callback).method == name and method_for_config(callback.config).name == name
    with pytest.raises(ValueError, match="unknown PEFT method"):
        peft_callback("prefix")
    with pytest.raises(TypeError):
        peft_callback("ia3", r=4)  # not an IA3 argument


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_fit_changes_only_what_the_method_owns(tmp_path, name):
    module = _lit.TinyLM()
    before = {n: t.detach().clone() for n, t in module.model.named_parameters()}
    trainer = _lit.trainer(tmp_path, max_steps=4, callbacks=[peft_callback(name, **CALLBACKS[name])])
    trainer.fit(module, _lit.loader())
    owned = dict(adapter_named_parameters(module.model))
    assert owned, "the method owns no tensor"
    for n, param in module.model.named_parameters():
        if n in owned:
            continue
        if n in before:  # a parameter of the base model
            assert torch.equal(param, before[n]), f"{name} changed the frozen {n}"
        assert not param.requires_grad, n
    start = {n: before.get(n) for n in owned}
    moved = [n for n, p in owned.items() if start[n] is None or not torch.equal(p, start[n])]
    assert moved, f"{name}: no owned tensor changed in the fit"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fresh_adapter_gives_the_base_outputs_and_files_round_trip(tmp_path, name):
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    model = _tiny.llama(seed=2)
    with torch.no_grad():
        base = model(ids).logits
    if name == "fishmask":  # chooses its weights from data (Fisher scores): random scores stand in
        from lightning_peft import apply_fishmask

        scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(4))
                  for n, p in model.named_parameters()}
        apply_fishmask(model, fisher=scores, config=CONFIGS[name])
    else:
        apply_peft(model, CONFIGS[name])
    with torch.no_grad():
        fresh = model(ids).logits
    # QLoRA starts from the 4-bit base, not the dense one; a fusion from its trained adapters
    if name not in ("qlora", "adapter_fusion", *NOT_ZERO_START):
        assert torch.equal(fresh, base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, param in adapter_named_parameters(model):
            param.add_(torch.randn(param.shape, generator=g).to(param.dtype) * 0.1)
        trained = model(ids).logits
    assert not torch.equal(trained, fresh)
    save_adapter(model, tmp_path / name)
    other = _tiny.llama(seed=2)
    if name == "qlora":
        apply_peft(other, CONFIGS[name])  # the 4-bit base first; the LoRA file loads into it
    load_adapter(other, tmp_path / name)
    with torch.no_grad():
        assert torch.equal(other(ids).logits, trained)

    # a bad file (a NaN in one tensor) is refused and the fresh model stays bit for bit
    from safetensors.torch import load_file, save_file

    weights = tmp_path / name / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]  # not FishMask's indices
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))  # no metadata: as if HF PEFT had written it
    victim = _tiny.llama(seed=2)
    state = {n: t.clone() for n, t in victim.state_dict().items()}
    with pytest.raises(ValueError, match=r"non-finite"):
        load_adapter(victim, tmp_path / name)
    assert victim.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in victim.state_dict().items())
    assert not has_adapters(victim) and not methods_in(victim)  # nothing was injected
    config = json.loads((tmp_path / name / "adapter_config.json").read_text())
    assert method_for_peft_type(config["peft_type"]).name == (get_method(name).file_format or name)


@pytest.mark.parametrize("method, kwargs, match", [
    *((m, {"adapter_dir": 3}, r"adapter_dir must be a directory path or None, got 3")
      for m in ("lora", "ia3", "bitfit", "prompt_tuning")),
    ("lora", {"adapter_dir": ""}, r"adapter_dir must be a directory path or None, got ''"),
    *((m, {"merge_on_fit_end": "no"}, r"merge_on_fit_end must be True or False, got 'no'")
      for m in ("lora", "ia3")),  # (the methods whose layers merge take it)
])
def test_every_callback_checks_its_common_arguments(method, kwargs, match):
    """Refused when the callback is built (a bad adapter_dir used to fail after training, a string
    merge_on_fit_end to count as True)."""
    from lightning_peft.callbacks import peft_callback

    extra = {"num_virtual_tokens": 2} if method == "prompt_tuning" else {}
    with pytest.raises(ValueError, match=match):
        peft_callback(method, **extra, **kwargs)


def test_the_rslora_name_builds_rslora():
    from lightning_peft.callbacks import peft_callback

    assert peft_callback("rslora", r=8).config.use_rslora is True
    assert peft_callback("lora", r=8).config.use_rslora is False
    with pytest.raises(ValueError, match=r"'rslora' is 'lora' with use_rslora=True; got use_rslora=False"):
        peft_callback("rslora", use_rslora=False)
