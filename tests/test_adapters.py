"""Bottleneck adapters (serial Houlsby/Pfeiffer, parallel) and AdapterFusion: forwards against a
naive float64 reference built from hooks on an untouched model, fresh adapters give the base
outputs, training changes only what the method owns, files round-trip, bad input is refused."""

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
import transformers

from lightning_peft import (
    AdapterCallback,
    AdapterConfig,
    AdapterFusionCallback,
    apply_adapter_fusion,
    apply_adapters,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from lightning_peft._base import adapter_named_parameters
from lightning_peft.methods.bottleneck import BottleneckAdapter, default_sites
from tests import _lit, _tiny


def t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                                decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def distilbert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.DistilBertConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    return transformers.DistilBertForSequenceClassification(cfg).eval()


MODELS = {"llama": _tiny.llama, "gpt2": _tiny.gpt2, "bert": _tiny.bert, "t5": t5, "distilbert": distilbert}


def run(model, ids):
    if isinstance(model, transformers.T5ForConditionalGeneration):
        return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    return model(ids).logits


def ids_for(seed: int = 0):
    return torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapter_named_parameters(model):
            param.copy_(torch.randn(param.shape, generator=g).to(param.dtype) * std)


def act(name):
    return {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}[name]


def first(out):
    return out if torch.is_tensor(out) else out[0]


def with_first(out, value):
    return value if torch.is_tensor(out) else (value, *out[1:])


def hooked_reference(base, sites, update):
    """``base`` (untouched) with forward hooks adding ``update(write, x, h)`` at each site: the
    naive formula, independent of the adapter layers."""
    ref = copy.deepcopy(base)
    stash = {}
    for write, read in sites.items():
        w_mod = ref.get_submodule(write)

        def pre(module, args, kwargs, read=read):
            stash[read] = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))

        def post(module, args, kwargs, out, write=write, read=read, same=(read == write)):
            h = first(out)
            x = stash.pop(read) if read in stash else (args[0] if args else kwargs.get("hidden_states"))
            return with_first(out, h + update(write, x, h))

        if read != write:
            ref.get_submodule(read).register_forward_pre_hook(pre, with_kwargs=True)
        w_mod.register_forward_hook(post, with_kwargs=True)
    return ref


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_forward_matches_the_formula_and_fresh_adapters_give_the_base(arch, placement):
    base = MODELS[arch]().double()
    ids = ids_for()
    with torch.no_grad():
        expected_base = run(base, ids)
    model = apply_adapters(copy.deepcopy(base), bottleneck=5, placement=placement, activation="gelu",
                           scaling=1.5)
    with torch.no_grad():
        assert torch.equal(run(model, ids), expected_base)  # W_up = 0, b_up = 0: bit for bit
    randomize(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
    sites = default_sites(base, "houlsby", placement)
    assert sorted(layers) == sorted(sites) and len(sites) >= 4

    def update(write, x, h):
        m = layers[write]
        src = h if placement == "serial" else x
        return 1.5 * (act("gelu")(src @ m.adapter_down.T + m.adapter_down_bias) @ m.adapter_up.T
                      + m.adapter_up_bias)

    ref = hooked_reference(base, sites, update)
    with torch.no_grad():
        got, want = run(model, ids), run(ref, ids)
    assert not torch.allclose(got, expected_base, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_pfeiffer_and_houlsby_sites():
    model = _tiny.llama()
    houlsby = default_sites(model, "houlsby", "serial")
    pfeiffer = default_sites(model, "pfeiffer", "serial")
    assert sorted(pfeiffer) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert sorted(houlsby) == sorted([*pfeiffer, *(f"model.layers.{i}.self_attn.o_proj" for i in range(2))])
    bert = default_sites(_tiny.bert(), "houlsby", "parallel")
    assert bert["bert.encoder.layer.0.output.dense"] == "bert.encoder.layer.0.intermediate"
    assert bert["bert.encoder.layer.0.attention.output.dense"] == "bert.encoder.layer.0.attention.self"
    decoder = default_sites(t5(), "pfeiffer", "serial")
    assert "decoder.block.0.layer.2.DenseReluDense.wo" in decoder  # after cross-attention: layer 2
    apply_adapters(model, bottleneck=3, config="pfeiffer")
    b, d = 3, 32
    assert trainable_parameters(model).trainable == 2 * (b * d + b + d * b + d)


def test_named_plain_modules():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    for placement in ("serial", "parallel"):
        model = apply_adapters(copy.deepcopy(net), bottleneck=2, placement=placement, target_modules=["2"])
        randomize(model)
        m = model[2]
        h = net(x)
        src = h if placement == "serial" else torch.relu(net[0](x))
        want = h + F.relu(src @ m.adapter_down.T + m.adapter_down_bias) @ m.adapter_up.T + m.adapter_up_bias
        torch.testing.assert_close(model(x), want)
        assert m.adapter_down.shape == ((2, 5) if placement == "serial" else (2, 8))


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_training_lowers_the_loss_and_changes_only_the_adapters(optimizer):
    model = _tiny.llama(seed=3).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_adapters(model, bottleneck=4, placement="parallel", scaling=4.0)
    owned = {id(p) for _, p in adapter_named_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == owned
    opt = (torch.optim.Adam(params, lr=1e-2, weight_decay=0.1) if optimizer == "adam"
           else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1))
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    for name, param in model.named_parameters():
        if id(param) in owned:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(param, before[key]), name


def test_files_round_trip_and_bad_files_leave_the_model_unchanged(tmp_path):
    ids = ids_for()
    model = apply_adapters(_tiny.bert(), bottleneck=3, placement="parallel", trainable_modules=["classifier"])
    randomize(model)
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["placement"] == "parallel"
    assert config["sites"]["bert.encoder.layer.1.output.dense"] == "bert.encoder.layer.1.intermediate"
    other = _tiny.bert()
    load_adapter(other, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(other(ids).logits, want)
    # a model of another shape: refused, unchanged
    victim = _tiny.llama()
    state = {k: v.clone() for k, v in victim.state_dict().items()}
    with pytest.raises(ValueError, match="sites names modules LlamaForCausalLM does not have"):
        load_adapter(victim, tmp_path / "a")
    assert victim.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in victim.state_dict().items())
    # loading into a model carrying other adapter settings is refused
    serial = apply_adapters(_tiny.bert(), bottleneck=3, trainable_modules=["classifier"])
    with pytest.raises(ValueError, match="placement is 'parallel', but the model carries adapters"):
        load_adapter(serial, tmp_path / "a")


def test_gpt2_generate_with_the_kv_cache_equals_full_forwards():
    model = apply_adapters(_tiny.gpt2(), bottleneck=4, placement="parallel")
    randomize(model, std=0.5)
    ids = torch.tensor([[1, 5, 7]])
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    seq = ids
    for _ in range(5):  # greedy without a cache
        with torch.no_grad():
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bottleneck=0), "bottleneck must be a positive integer"),
    (dict(bottleneck=-3), "bottleneck must be a positive integer"),
    (dict(bottleneck=2.5), "bottleneck must be a positive integer"),
    (dict(placement="middle"), "placement must be one of ['serial', 'parallel']"),
    (dict(activation="softplus"), "activation must be one of"),
    (dict(config="lora"), "config must be one of ['houlsby', 'pfeiffer']"),
    (dict(scaling=float("nan")), "scaling must be a finite nonzero number"),
    (dict(config="houlsby", target_modules=["fc"]), "pass one of the two"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AdapterConfig(**kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        AdapterCallback(**kwargs)


def test_targets_that_match_nothing_list_what_exists():
    model = _tiny.llama()
    with pytest.raises(ValueError, match=r"matches no module of LlamaForCausalLM.*'down_proj'"):
        apply_adapters(model, target_modules=["nope"])
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="no transformer block of Sequential has a known layout"):
        apply_adapters(plain)
    assert not any(isinstance(m, BottleneckAdapter) for m in model.modules())


# --------------------------------------------------------------------------------------------
# AdapterFusion
# --------------------------------------------------------------------------------------------


def _saved_adapters(tmp_path, make, placement="serial", widths=(3, 5), activation="relu"):
    dirs = []
    for i, b in enumerate(widths):
        model = apply_adapters(make(), bottleneck=b, placement=placement, activation=activation,
                               scaling=1.0 + i)
        randomize(model, seed=20 + i)
        save_adapter(model, tmp_path / f"task{i}")
        dirs.append(str(tmp_path / f"task{i}"))
    return dirs


@pytest.mark.parametrize("arch, placement", [("llama", "serial"), ("bert", "parallel"), ("gpt2", "serial")])
def test_fusion_forward_matches_the_formula(tmp_path, arch, placement):
    make = lambda: MODELS[arch]().double()  # noqa: E731
    dirs = _saved_adapters(tmp_path, make, placement)
    singles = []
    for d in dirs:
        single = make()
        load_adapter(single, d)
        singles.append({n: m for n, m in single.named_modules() if isinstance(m, BottleneckAdapter)})
    base = make()
    model = apply_adapter_fusion(make(), dirs, temperature=2.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained-looking fusion
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.3)
    fusion = {n: m for n, m in model.named_modules() if type(m).__name__ == "AdapterFusionLayer"}
    sites = default_sites(base, "houlsby", placement)
    assert sorted(fusion) == sorted(sites)

    def update(write, x, h):
        f = fusion[write]
        outs = []
        for n, single in enumerate(singles):
            m = single[write]
            src = h if placement == "serial" else x
            outs.append((1.0 + n) * (F.relu(src @ m.adapter_down.T + m.adapter_down_bias) @ m.adapter_up.T
                                     + m.adapter_up_bias))
        q = h @ f.fusion_query.T + f.fusion_query_bias
        scores = torch.stack([(q * (a @ f.fusion_key.T + f.fusion_key_bias)).sum(-1) for a in outs]) / 2.0
        p = torch.softmax(scores, dim=0)
        return sum(p[n].unsqueeze(-1) * (a @ f.fusion_value.T) for n, a in enumerate(outs))

    ref = hooked_reference(base, sites, update)
    ids = ids_for(1)
    with torch.no_grad():
        torch.testing.assert_close(run(model, ids), run(ref, ids), rtol=1e-10, atol=1e-10)


def test_fusion_takes_source_adapters_saved_with_their_task_heads(tmp_path):
    """Classifier adapters are saved with their head (``trainable_modules``): the fusion takes their
    site adapters and leaves their heads out (they used to make the adapter refused), its outputs
    those of the same adapters saved without heads; the fusion trains a head of its own."""
    with_heads, bare = [], []
    for i, b in enumerate((3, 5)):
        model = apply_adapters(_tiny.bert(), bottleneck=b, trainable_modules=["classifier"])
        randomize(model, seed=20 + i)
        save_adapter(model, tmp_path / f"head{i}")
        with_heads.append(str(tmp_path / f"head{i}"))
        model.classifier = model.classifier.modules_to_save  # the same adapter without its head
        save_adapter(apply_adapters(model, bottleneck=b), tmp_path / f"bare{i}")
        bare.append(str(tmp_path / f"bare{i}"))
    fused = apply_adapter_fusion(_tiny.bert(), with_heads, trainable_modules=["classifier"])
    reference = apply_adapter_fusion(_tiny.bert(), bare, trainable_modules=["classifier"])
    ids = ids_for(1)
    with torch.no_grad():
        torch.testing.assert_close(run(fused, ids), run(reference, ids), rtol=0, atol=0)
    assert fused.classifier.modules_to_save.weight.requires_grad


def test_fusion_trains_only_the_fusion_and_round_trips(tmp_path):
    dirs = _saved_adapters(tmp_path, _tiny.llama)
    model = apply_adapter_fusion(_tiny.llama().train(), dirs)
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".fusion_" in n for n in trainable)
    value = model.model.layers[0].mlp.down_proj.fusion_value
    assert torch.equal(value, torch.eye(32))  # V starts as the identity
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for n, b in model.named_buffers():
        assert torch.equal(b, frozen[n]), n  # the fused adapters stay as loaded
    for n, p in model.named_parameters():
        assert (n in trainable) != torch.equal(p, before[n]), n
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(model, tmp_path / "fusion")
    config = json.loads((tmp_path / "fusion" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTER_FUSION" and config["adapters"] == ["task0", "task1"]
    assert config["bottlenecks"] == [3, 5]
    other = _tiny.llama()
    load_adapter(other, tmp_path / "fusion")  # self-contained: the adapters come from the file
    with torch.no_grad():
        assert torch.equal(other(ids).logits, want)


def test_fusion_refuses_adapters_that_do_not_fit_together(tmp_path):
    serial = _saved_adapters(tmp_path / "s", _tiny.llama)
    parallel = _saved_adapters(tmp_path / "p", _tiny.llama, placement="parallel")
    model = _tiny.llama()
    with pytest.raises(ValueError, match="the adapters differ in placement"):
        apply_adapter_fusion(model, [serial[0], parallel[1]])
    with pytest.raises(ValueError, match="adapter_dirs must name at least two adapters"):
        apply_adapter_fusion(model, [serial[0]])
    from lightning_peft import apply_lora

    lora = apply_lora(_tiny.llama(), r=2)
    save_adapter(lora, tmp_path / "lora")
    with pytest.raises(ValueError, match="holds a 'LORA' adapter; AdapterFusion fuses bottleneck adapters"):
        apply_adapter_fusion(model, [serial[0], str(tmp_path / "lora")])
    with pytest.raises(FileNotFoundError):
        apply_adapter_fusion(model, [serial[0], str(tmp_path / "missing")])
    gpt = _saved_adapters(tmp_path / "g", _tiny.gpt2)
    with pytest.raises(ValueError, match="sites names modules LlamaForCausalLM does not have"):
        apply_adapter_fusion(model, gpt)
    assert not any(isinstance(m, BottleneckAdapter) for m in model.modules())
    assert all(not type(m).__name__.startswith("AdapterFusion") for m in model.modules())


def test_fusion_callback_trains_through_lightning(tmp_path):
    dirs = _saved_adapters(tmp_path, _tiny.llama)
    module = _lit.TinyLM()
    callback = AdapterFusionCallback(adapter_dirs=dirs, adapter_dir=str(tmp_path / "out"))
    trainer = _lit.trainer(tmp_path, max_steps=3, callbacks=[callback])
    trainer.fit(module, _lit.loader())
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    other = _tiny.llama()
    load_adapter(other, tmp_path / "out")
    ids = ids_for()
    with torch.no_grad():
        assert torch.equal(other(ids).logits, module.model.eval()(ids).logits)


def test_a_block_whose_last_linear_is_not_its_output_is_refused():
    """Qwen2-MoE's mlp ends with ``shared_expert_gate`` (hidden -> 1): the parallel adapter took
    width 1 and its (..., 1) update was broadcast over every feature, silently. The width is now
    checked against the hidden size when the adapter goes in, and the update's width when it
    is added; the model is left unchanged."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      moe_intermediate_size=16, shared_expert_intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    model = transformers.Qwen2MoeForCausalLM(cfg).eval()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers.0.mlp.*gives 1 features, not the model's hidden size 32"):
        apply_adapters(model, bottleneck=4, placement="parallel")
    assert not any(isinstance(m, BottleneckAdapter) for m in model.modules())
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    layer = BottleneckAdapter(torch.nn.Linear(8, 8), 8, 1, 2, "relu", "parallel", 1.0)  # a wrong width
    with pytest.raises(ValueError, match="the update has 1 features but the output it is added to has 8"):
        layer(torch.randn(2, 8))


def test_one_trainable_module_may_be_named_as_a_string():
    """``trainable_modules="classifier"`` is one module in apply_adapters and apply_intrinsic, as
    in their configs (it was split into characters: "entry 'c' matches no module")."""
    from lightning_peft import apply_intrinsic
    from lightning_peft._base import ModulesToSave

    for apply in (lambda m: apply_adapters(m, bottleneck=4, trainable_modules="classifier"),
                  lambda m: apply_intrinsic(m, d=20, said=False, trainable_modules="classifier")):
        model = apply(_tiny.bert())
        assert isinstance(model.classifier, ModulesToSave)


def test_adapter_fusion_refuses_one_directory_as_a_string():
    """A string ``adapter_dirs`` got the config's message, not "names a directory twice" about
    its characters."""
    from lightning_peft import apply_adapter_fusion

    with pytest.raises(ValueError, match="adapter_dirs must be a list of adapter directories, got 'out/"):
        apply_adapter_fusion(_tiny.bert(), "out/task_a")


def test_merge_adapters_says_which_layers_stay():
    """Adapters that cannot merge (nonlinear, prompts) were left silently while merge_adapters
    promises the base model's speed; a model carrying them now gets a warning naming them, and
    the outputs do not change."""
    from lightning_peft import merge_adapters

    model = apply_adapters(_tiny.llama(), bottleneck=4)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        before = model(ids).logits
        with pytest.warns(UserWarning, match=r"cannot merge as they are: BottleneckAdapter \(a nonlinear"):
            merge_adapters(model)
        assert torch.equal(model(ids).logits, before)
