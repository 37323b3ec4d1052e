"""LLaMA-Adapter (adaption prompts, arXiv 2303.16199): zero-init, HF PEFT's ADAPTION_PROMPT forward
and files both ways, generation with the KV cache, training, checks."""

import json

import pytest
import torch
import transformers

from lightning_peft import (
    LlamaAdapterConfig,
    apply_llama_adapter,
    apply_peft,
    load_adapter,
    merge_adapters,
    peft_callback,
    save_adapter,
    trainable_parameters,
)
from lightning_peft._base import adapter_named_parameters, has_adapters
from lightning_peft.methods import get_method, method_for_peft_type
from lightning_peft.methods.llama_adapter import LlamaAdapterAttention, llama_adapter_layers
from tests import _tiny

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def _tiny_model(kind: str, seed: int = 0, layers: int = 3):
    """A tiny random causal LM of ``kind`` with grouped-query attention (4 heads, 2 kv heads)."""
    if kind == "llama":
        return _tiny.llama(seed=seed, layers=layers)
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama_wide_heads":  # head_dim 16: heads·head_dim (64) is not the hidden size (32)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, head_dim=16))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_local_experts=2))
    else:
        raise ValueError(kind)
    return model.eval()


def _randomize(model, seed: int = 3, scale: float = 1.0) -> None:
    """A trained-looking adapter: random prompts, nonzero gates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] in ("adaption_prompt", "adaption_gate"):
                param.copy_(torch.randn(param.shape, generator=g) * scale)


def _peft_model(seed: int, adapter_len: int, adapter_layers: int, kind: str = "llama"):
    from peft import AdaptionPromptConfig, get_peft_model

    config = AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                  task_type="CAUSAL_LM")
    return get_peft_model(_tiny_model(kind, seed), config).eval()


def _copy_into_peft(ours, peft_model) -> None:
    theirs = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in adapter_named_parameters(ours):
            theirs["base_model.model." + name].copy_(param)
            copied += 1
    assert copied == sum("adaption_" in n for n in theirs)


# --------------------------------------------------------------------------------------------
# config and checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(adapter_len=0), "adapter_len"), (dict(adapter_len=-2), "adapter_len"),
    (dict(adapter_len=True), "adapter_len"), (dict(adapter_len=2.0), "adapter_len"),
    (dict(adapter_layers=0), "adapter_layers"), (dict(adapter_layers=-1), "adapter_layers"),
    (dict(target_modules="layers.self_attn"), "target_modules"), (dict(target_modules=""), "target_modules"),
])
def test_config_refuses_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        LlamaAdapterConfig(**kwargs)


def test_too_many_layers_is_refused_and_the_model_unchanged():
    model = _tiny.llama()
    with pytest.raises(ValueError, match=r"adapter_layers=3 but LlamaForCausalLM has 2 attention modules"):
        apply_llama_adapter(model, adapter_layers=3)
    assert not has_adapters(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("build, kind", [(_tiny.gpt2, "gpt2"), (_tiny.bert, "bert")])
def test_unsupported_models_are_refused_naming_their_type(build, kind):
    model = build()
    with pytest.raises(ValueError, match=rf"supports .*\['llama', 'mistral', 'mixtral', 'qwen2'\].*"
                                         rf"model type '{kind}'"):
        apply_llama_adapter(model)
    assert not has_adapters(model)


def test_unsupported_attention_under_the_target_name_is_refused():
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn' \(Qwen3Attention\) belongs to model "
                                         r"type 'qwen3'"):
        apply_llama_adapter(transformers.Qwen3ForCausalLM(cfg))


# --------------------------------------------------------------------------------------------
# the adapter itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "llama_wide_heads", "mistral", "qwen2", "mixtral"])
def test_fresh_adapter_is_bit_identical_and_cache_changes_nothing(kind):
    model = _tiny_model(kind)
    with torch.no_grad():
        base = model(IDS).logits
    apply_llama_adapter(model, adapter_len=4, adapter_layers=2)
    names = [n for n, _ in llama_adapter_layers(model)]
    assert names == ["model.layers.1.self_attn", "model.layers.2.self_attn"]  # the top two
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}": s for n in names
                         for k, s in (("adaption_prompt", (1, 4, 32)), ("adaption_gate", (1,)))}
    assert trainable_parameters(model).trainable == 2 * (4 * 32 + 1)
    _randomize(model, scale=0.5)
    with torch.no_grad():
        full = model(IDS).logits
        assert not torch.allclose(full, base, atol=1e-3)
        # the prompt is not in the cache: feeding the tokens one at a time gives the same logits
        cache = transformers.DynamicCache(config=model.config)
        steps = [model(IDS[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(IDS.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_defaults_wrap_every_layer_and_apply_is_idempotent():
    model = apply_llama_adapter(_tiny.llama())
    layers = llama_adapter_layers(model)
    assert len(layers) == 2 and all(m.adapter_len == 10 for _, m in layers)
    assert layers[0][1].layer_idx == 0  # attributes of the wrapped attention
    prompts = [m.adaption_prompt for _, m in layers]
    apply_llama_adapter(model, adapter_len=10, adapter_layers=2)
    assert [m.adaption_prompt for _, m in llama_adapter_layers(model)] == prompts
    with pytest.raises(ValueError, match="already carries a LLaMA-Adapter"):
        apply_llama_adapter(model, adapter_len=5)
    with pytest.raises(ValueError, match="already carries a LLaMA-Adapter"):
        apply_llama_adapter(model, adapter_layers=1)


def test_not_mergeable_merge_adapters_leaves_it():
    model = apply_llama_adapter(_tiny.llama(), adapter_len=3)
    _randomize(model)
    with torch.no_grad():
        before = model(IDS).logits
        with pytest.warns(UserWarning, match=r"cannot merge as they are: LlamaAdapterAttention"):
            merge_adapters(model)
        assert torch.equal(model(IDS).logits, before)
    assert len(llama_adapter_layers(model)) == 2 and not hasattr(LlamaAdapterAttention, "merge")


@pytest.mark.parametrize("kind, dtype", [("llama", torch.float32), ("mistral", torch.float32),
                                         ("llama", torch.bfloat16)])
def test_forward_matches_hf_peft_for_the_same_values(kind, dtype):
    ours = apply_llama_adapter(_tiny_model(kind, seed=1).to(dtype), adapter_len=5, adapter_layers=2)
    assert {p.dtype for _, p in adapter_named_parameters(ours)} == {dtype}  # as PEFT: the model's dtype
    _randomize(ours)
    theirs = _peft_model(1, 5, 2, kind).to(dtype)
    _copy_into_peft(ours, theirs)
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, theirs(input_ids=IDS).logits)


def test_attention_bias_is_not_added_twice():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
        base = model(IDS).logits
        apply_llama_adapter(model, adapter_len=3)
        assert torch.equal(model(IDS).logits, base)


# --------------------------------------------------------------------------------------------
# files: HF PEFT's both ways
# --------------------------------------------------------------------------------------------


def test_our_file_loads_in_hf_peft_with_identical_logits(tmp_path):
    from peft import PeftModel

    model = apply_llama_adapter(_tiny.llama(seed=2, layers=3), adapter_len=4, adapter_layers=2)
    _randomize(model)
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    expected = {"peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 2,
                "target_modules": "self_attn", "task_type": "CAUSAL_LM"}
    assert {k: config[k] for k in expected} == expected
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == [
        f"base_model.model.model.layers.{i}.self_attn.{k}" for i in (1, 2)
        for k in ("adaption_gate", "adaption_prompt")]
    theirs = PeftModel.from_pretrained(_tiny.llama(seed=2, layers=3), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=IDS).logits, model(IDS).logits)


def test_hf_peft_file_loads_here_with_the_same_logits(tmp_path):
    theirs = _peft_model(2, 6, 1)
    _randomize(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    model = load_adapter(_tiny_model("llama", seed=2), tmp_path / "peft")
    assert [n for n, _ in llama_adapter_layers(model)] == ["model.layers.2.self_attn"]
    with torch.no_grad():
        # to float32 rounding (PEFT's attention over the adaption prompt runs other products)
        torch.testing.assert_close(model(IDS).logits, theirs(input_ids=IDS).logits)
    load_adapter(model, tmp_path / "peft")  # into the model that carries it: the tensors again
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "adapter_len": 5}))
    with pytest.raises(ValueError, match="already carries a LLaMA-Adapter"):
        load_adapter(model, tmp_path / "peft")
    for bad, field in ((dict(adapter_layers=4), "adapter_layers=4 but"), (dict(adapter_len=0), "adapter_len"),
                       (dict(adapter_layers=None), "adapter_layers"),
                       (dict(target_modules="attn"), "no module is named 'attn'")):
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, **bad}))
        fresh = _tiny_model("llama", seed=2)
        with pytest.raises(ValueError, match=field):
            load_adapter(fresh, tmp_path / "peft")
        assert not has_adapters(fresh)


# --------------------------------------------------------------------------------------------
# generation, training, evaluation, callback
# --------------------------------------------------------------------------------------------


def test_generate_with_cache_equals_without_and_hf_peft():
    model = apply_llama_adapter(_tiny_model("llama", seed=4), adapter_len=3, adapter_layers=2)
    _randomize(model, scale=2.0)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    prompt = IDS[:, :5]
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
        theirs = _peft_model(4, 3, 2)
        _copy_into_peft(model, theirs)
        peft_out = theirs.generate(input_ids=prompt, use_cache=True, **kw)
        base = _tiny_model("llama", seed=4).generate(prompt, use_cache=True, **kw)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached) and torch.equal(cached, peft_out)
    assert not torch.equal(cached, base)  # the adapter does change what is generated


def test_training_lowers_the_loss_and_leaves_the_base_bit_identical():
    model = apply_llama_adapter(_tiny.llama(seed=5).train(), adapter_len=4)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    ids = IDS[:1].repeat(2, 1)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert all(float(m.adaption_gate.abs()) > 0 for _, m in llama_adapter_layers(model))


def test_generate_answers_works_with_the_adapter():
    from lightning_peft.evaluation import generate_answers

    records = [{"instruction": "Say hello.", "input": ""},
               {"instruction": "Extract the triples.", "input": "Ada Lovelace lives in London."},
               {"instruction": "Name a colour."}]
    tok = _tiny.tokenizer([r["instruction"] + " " + r.get("input", "") for r in records], 300)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256)
    model = apply_llama_adapter(transformers.LlamaForCausalLM(cfg).eval(), adapter_len=3)
    _randomize(model)
    answers = generate_answers(model, tok, records, max_new_tokens=5, batch_size=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert generate_answers(model, tok, records, max_new_tokens=5, batch_size=1) == answers


def test_registry_and_callback():
    method = get_method("llama_adapter")
    assert method is get_method("adaption_prompt") and method_for_peft_type("ADAPTION_PROMPT") is method
    model = apply_peft(_tiny.llama(), LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    assert len(llama_adapter_layers(model)) == 1
    callback = peft_callback("llama_adapter", adapter_len=4, adapter_layers=1)
    assert type(callback).__name__ == "LlamaAdapterCallback"
    assert callback.config == LlamaAdapterConfig(adapter_len=4, adapter_layers=1)
    with pytest.raises(ValueError, match="adapter_len must be"):
        peft_callback("llama_adapter", adapter_len=0)
