"""Prefix tuning / P-tuning v2 (lightning_peft/methods/prefix_tuning.py): HF PEFT's outputs and files
both ways (tiny Llama with grouped-query attention, GPT-2, BERT classifier), generation with and
without the KV cache, the prefix present exactly once, training, bad arguments."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from peft import PrefixTuningConfig as PeftPrefixTuningConfig

from lightning_peft import (
    PrefixTuningConfig,
    apply_prefix_tuning,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from lightning_peft.methods.prefix_tuning import model_layout, prefix_encoder
from tests import _tiny

N = 3
CAUSAL = {"llama": _tiny.llama, "gpt2": _tiny.gpt2}


def _randomize(model: torch.nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in prefix_encoder(model).parameters():
            param.copy_(torch.randn(param.shape, generator=g))


def _ours(kind: str, projection: bool, **kwargs) -> torch.nn.Module:
    build = CAUSAL.get(kind, _tiny.bert)
    model = apply_prefix_tuning(build(), num_virtual_tokens=N, prefix_projection=projection, **kwargs)
    _randomize(model)
    return model


def _peft(kind: str, projection: bool, ours: torch.nn.Module | None = None):
    build = CAUSAL.get(kind, _tiny.bert)
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    model = get_peft_model(build(), PeftPrefixTuningConfig(task_type=task, num_virtual_tokens=N,
                                                           prefix_projection=projection))
    if ours is not None:  # the same prefix (and MLP)
        model.prompt_encoder["default"].load_state_dict(prefix_encoder(ours).state_dict())
    return model


def _inputs(seed: int = 0, vocab: int = 40, batch: int = 2, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row
    return ids, mask


def _peft_cls_logits(peft_model, ids, mask):
    """What HF PEFT's SEQ_CLS prefix forward computes (its ``PeftModelForSequenceClassification``
    looks for ``past_key_values`` in BertModel's signature, which transformers 5 renamed ``cache``,
    and refuses): its prefix cache and extended mask, passed to the base model."""
    cache = peft_model.get_prompt(ids.shape[0])
    mask = torch.cat([torch.ones(ids.shape[0], N, dtype=mask.dtype), mask], dim=1)
    return peft_model.base_model(input_ids=ids, attention_mask=mask, cache=cache).logits


# --------------------------------------------------------------------------------------------
# Outputs and files against HF PEFT
# --------------------------------------------------------------------------------------------


def _same(got, want, projection):
    """Bit for bit without the projection; with it to float32 rounding: the MLP's products have
    other shapes than PEFT's, which some CPUs' BLAS (MKL on an AMD EPYC) rounds differently."""
    if projection:
        torch.testing.assert_close(got, want)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", sorted(CAUSAL))
def test_logits_equal_peft(kind, projection):
    ours = _ours(kind, projection)
    peft_model = _peft(kind, projection, ours)
    ids, mask = _inputs()
    with torch.no_grad():
        _same(ours(input_ids=ids, attention_mask=mask).logits,
              peft_model(input_ids=ids, attention_mask=mask).logits, projection)
        _same(ours(ids).logits, peft_model(input_ids=ids).logits, projection)
        positions = torch.arange(6).expand(2, -1)
        _same(ours(ids, position_ids=positions).logits,
              peft_model(input_ids=ids, position_ids=positions).logits, projection)
        base = CAUSAL[kind]()(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ours(input_ids=ids, attention_mask=mask).logits, base)


def test_grouped_query_attention_layout_is_peft_s():
    model = _tiny.llama()  # 4 heads of 8, 2 key/value heads
    layout = model_layout(model)
    assert (layout.num_layers, layout.num_heads, layout.token_dim) == (2, 2, 16)
    peft_model = _peft("llama", False)
    config = peft_model.peft_config["default"]
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (2, 2, 16)
    apply_prefix_tuning(model, num_virtual_tokens=N)
    assert prefix_encoder(model).embedding.weight.shape == (N, 2 * 2 * 16)
    for kind in ("gpt2", "bert"):
        base = CAUSAL.get(kind, _tiny.bert)()
        layout = model_layout(base)
        assert (layout.num_layers, layout.num_heads, layout.token_dim) == (2, 2, 24)


@pytest.mark.parametrize("projection", [False, True])
def test_bert_classifier_equals_peft_prefix(projection):
    ours = _ours("bert", projection, modules_to_save=["classifier"])
    peft_model = _peft("bert", projection, ours)
    ids, mask = _inputs(length=7)
    mask[0, :2], mask[0, 5:] = 1, 0  # right padding, as BERT tokenizers pad
    with torch.no_grad():
        _same(ours(input_ids=ids, attention_mask=mask).logits,
              _peft_cls_logits(peft_model, ids, mask), projection)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", sorted(CAUSAL))
def test_files_load_both_ways(tmp_path, kind, projection):
    ours = _ours(kind, projection)
    ids, mask = _inputs()
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).logits
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert config["prefix_projection"] is projection and config["num_virtual_tokens"] == N
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    layout = model_layout(ours)
    assert list(tensors) == ["prompt_embeddings"]  # with projection: the MLP's output, as PEFT
    assert tensors["prompt_embeddings"].shape == (N, layout.num_layers * 2 * layout.token_dim)

    loaded = PeftModel.from_pretrained(CAUSAL[kind](), str(tmp_path / "ours"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)

    peft_model = _peft(kind, projection, ours)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    mine = load_adapter(CAUSAL[kind](), tmp_path / "peft")
    encoder = prefix_encoder(mine)
    assert encoder.inference_mode and not encoder.projecting  # only P, as PEFT loads it
    with torch.no_grad():
        assert torch.equal(mine(input_ids=ids, attention_mask=mask).logits, expected)
    # our file of a loaded (inference-mode) prefix is PEFT's file again
    save_adapter(mine, tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert torch.equal(again["prompt_embeddings"], tensors["prompt_embeddings"])
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["prefix_projection"] \
        is projection


def test_bert_classifier_files_load_both_ways(tmp_path):
    ours = _ours("bert", False, modules_to_save=["classifier"])
    with torch.no_grad():
        ours.classifier.modules_to_save.weight.add_(1.0)
    ids, mask = _inputs(length=7)
    mask[0] = 1
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).logits
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == [
        "base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]  # PEFT's keys
    loaded = PeftModel.from_pretrained(_tiny.bert(), str(tmp_path / "ours"))
    with torch.no_grad():
        assert torch.equal(_peft_cls_logits(loaded, ids, mask), expected)

    peft_model = _peft("bert", False, ours)
    with torch.no_grad():
        peft_model.base_model.classifier.modules_to_save["default"].weight.add_(1.0)
    peft_model.save_pretrained(str(tmp_path / "peft"))  # lists modules_to_save "classifier", "score"
    mine = load_adapter(_tiny.bert(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(mine(input_ids=ids, attention_mask=mask).logits, expected)


def test_loading_checks_before_changing_anything(tmp_path):
    ours = _ours("llama", True)
    save_adapter(ours, tmp_path / "a")
    with pytest.raises(ValueError, match="computed by an MLP"):  # a projecting prefix cannot take P
        load_adapter(_ours("llama", True), tmp_path / "a")
    other = apply_prefix_tuning(_tiny.llama(), num_virtual_tokens=N + 1)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        load_adapter(other, tmp_path / "a")
    gpt2 = _tiny.gpt2()
    state = {k: v.clone() for k, v in gpt2.state_dict().items()}
    with pytest.raises(ValueError, match="token_dim is 16, but model type 'gpt2' has 24"):
        load_adapter(gpt2, tmp_path / "a")
    assert prefix_encoder(gpt2) is None and gpt2.state_dict().keys() == state.keys()
    # an inference-mode prefix takes another file's values
    target = load_adapter(_tiny.llama(), tmp_path / "a")
    _randomize(ours, seed=9)
    save_adapter(ours, tmp_path / "b")
    load_adapter(target, tmp_path / "b")
    ids, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(target(ids).logits, ours(ids).logits)


# --------------------------------------------------------------------------------------------
# Generation: the prefix exactly once, with and without the cache
# --------------------------------------------------------------------------------------------


def _greedy(model, ids, mask, steps: int) -> torch.Tensor:
    """Reference: greedy decoding by full forward passes (no cache), positions from the mask as
    ``generate`` gives them."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", sorted(CAUSAL))
def test_generate_with_cache_equals_without_and_peft(kind, projection):
    ours = _ours(kind, projection)
    peft_model = _peft(kind, projection, ours)
    ids, mask = _inputs()
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = ours.generate(input_ids=ids, attention_mask=mask, use_cache=True, **options)
        uncached = ours.generate(input_ids=ids, attention_mask=mask, use_cache=False, **options)
        reference = _greedy(peft_model, ids, mask, 8)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)  # HF PEFT's forward, token for token
    with torch.no_grad():  # the base model generates something else
        base = CAUSAL[kind]().generate(input_ids=ids, attention_mask=mask, **options)
    assert not torch.equal(base, cached)


@pytest.mark.parametrize("kind", sorted(CAUSAL))
def test_prefix_is_in_the_cache_exactly_once(kind):
    ours = _ours(kind, False)
    ids, mask = _inputs()
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, use_cache=True,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        cache = out.cache
        assert cache.get_seq_length() == N + ids.shape[1]
        keys = cache.layers[0].keys
        assert keys.shape[1] == model_layout(ours).num_heads  # key/value heads (GQA: 2 of 4)
        # a step over the returned cache adds the new token only, and equals a full recomputation
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones_like(token)], 1)
        step = ours(input_ids=token, attention_mask=mask2, cache=cache,
                    position_ids=mask2.sum(-1, keepdim=True) - 1)
        assert cache.get_seq_length() == N + ids.shape[1] + 1
        full = ours(input_ids=torch.cat([ids, token], 1), attention_mask=mask2,
                    position_ids=(mask2.cumsum(-1) - 1).clamp(min=0))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
    # the cache generate builds: prefill (empty cache) gets the prefix, later steps do not
    lengths = []
    hook = ours.register_forward_hook(lambda m, a, o: lengths.append(o.cache.get_seq_length()))
    with torch.no_grad():
        ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    hook.remove()
    assert lengths == [N + 6, N + 7, N + 8]


def test_a_deep_copy_keeps_its_own_prefix():
    ours = _ours("llama", True)
    twin = copy.deepcopy(ours)
    ids, _ = _inputs()
    with torch.no_grad():
        before = ours(ids).logits
        _randomize(ours, seed=11)
        assert torch.equal(twin(ids).logits, before)
        assert not torch.equal(ours(ids).logits, before)


def test_generate_answers_on_a_prefix_model():
    from lightning_peft.evaluation import encode_prompt, generate_answers

    records = [{"instruction": "Name a colour."}, {"instruction": "Say hello to the world, please."},
               {"instruction": "Count to three."}]
    tok = _tiny.tokenizer([r["instruction"] for r in records], 300)
    model = apply_prefix_tuning(_tiny.llama(vocab=len(tok)), num_virtual_tokens=4)
    _randomize(model)
    answers = generate_answers(model, tok, records, max_new_tokens=5, batch_size=3)
    assert len(answers) == 3
    for record, answer in zip(records, answers):  # left-padded batches = each prompt alone
        ids = torch.tensor([encode_prompt(tok, record["instruction"], "")])
        with torch.no_grad():
            alone = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert answer == tok.decode(alone[0, ids.shape[1]:], skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _train(model, batches, steps: int = 20, lr: float = 0.1) -> tuple[float, float]:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses[0], losses[-1]


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_training_lowers_the_loss_and_leaves_the_base(kind, projection):
    kwargs = {"modules_to_save": ["classifier"]} if kind == "bert" else {}
    model = apply_prefix_tuning(CAUSAL.get(kind, _tiny.bert)(), num_virtual_tokens=N,
                                prefix_projection=projection, **kwargs)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    owned = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids, mask = _inputs(seed=1, batch=4, length=8)
    if kind == "bert":
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    else:
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    first, last = _train(model, [batch])
    assert last < first - 0.05  # a prefix over a random tiny LM moves its loss a little
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name
        else:
            assert not torch.equal(param, owned[name]), f"{name} did not train"
    expected = {"embedding.weight"} | ({"transform.0.weight", "transform.0.bias", "transform.2.weight",
                                        "transform.2.bias"} if projection else set())
    assert {n.removeprefix("prefix_encoder.") for n in owned if n.startswith("prefix_encoder.")} == expected
    if kind == "bert":
        assert {n for n in owned if not n.startswith("prefix_encoder.")} == {
            "classifier.modules_to_save.weight", "classifier.modules_to_save.bias"}


@pytest.mark.parametrize("projection", [False, True])
def test_trainable_parameters_count_the_prefix_as_peft(projection):
    ours = apply_prefix_tuning(_tiny.llama(), num_virtual_tokens=N, prefix_projection=projection)
    d, width = 16, 2 * 2 * 16  # token_dim (2 kv heads of 8), layers·2·token_dim
    expected = N * d + (d * d + d) + (d * width + width) if projection else N * width
    counts = trainable_parameters(ours)
    assert counts.trainable == expected
    peft_model = _peft("llama", projection)
    assert counts.trainable == peft_model.get_nb_trainable_parameters()[0]
    assert counts.total == sum(p.numel() for p in _tiny.llama().parameters()) + expected


def test_applying_twice_is_harmless_and_callers_change_nothing():
    model = _ours("llama", False)
    ids, _ = _inputs()
    with torch.no_grad():
        once = model(ids).logits
        apply_prefix_tuning(model, num_virtual_tokens=N)
        assert torch.equal(model(ids).logits, once)
    assert len(model._forward_pre_hooks) == 1
    with pytest.raises(ValueError, match="already carries a prefix"):
        apply_prefix_tuning(model, num_virtual_tokens=N + 1)
    with pytest.raises(ValueError, match="not both"):
        apply_prefix_tuning(model, num_virtual_tokens=5, config=PrefixTuningConfig())


# --------------------------------------------------------------------------------------------
# Bad arguments and models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -2, 1.5, True, None])
def test_num_virtual_tokens_must_be_positive(value):
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        apply_prefix_tuning(_tiny.llama(), num_virtual_tokens=value)


@pytest.mark.parametrize("field, value, message", [
    ("prefix_projection", "yes", "prefix_projection must be a bool"),
    ("encoder_hidden_size", 0, "encoder_hidden_size must be a positive integer"),
    ("init_weights", "ones", "init_weights must be None"),
    ("token_dim", 32, "token_dim is 32, but model type 'llama' has 16"),
    ("num_layers", 3, "num_layers is 3, but model type 'llama' has 2"),
])
def test_bad_fields_are_named(field, value, message):
    model = _tiny.llama()
    with pytest.raises(ValueError, match=message):
        apply_prefix_tuning(model, **{field: value})
    assert prefix_encoder(model) is None


def test_unsupported_layouts_are_refused_naming_the_model_type():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="model type 't5' is an encoder-decoder model"):
        apply_prefix_tuning(t5, num_virtual_tokens=2)
    distil = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=32, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    with pytest.raises(ValueError, match="model type 'distilbert'.*takes no cache"):
        apply_prefix_tuning(distil, num_virtual_tokens=2)
    with pytest.raises(ValueError, match="needs a transformers model"):
        apply_prefix_tuning(torch.nn.Linear(4, 4), num_virtual_tokens=2)
    model = _tiny.gpt2()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        apply_prefix_tuning(model, num_virtual_tokens=2)
    ours = _ours("llama", False)
    ids, mask = _inputs()
    with pytest.raises(ValueError, match="2-D attention_mask"):
        ours(ids, attention_mask=mask[:, None, None, :].float())


def test_callback_trains_the_prefix_and_writes_peft_files(tmp_path):
    from lightning_peft import PrefixTuningCallback
    from tests import _lit

    module = _lit.TinyLM()
    callback = PrefixTuningCallback(num_virtual_tokens=N, prefix_projection=True,
                                    adapter_dir=str(tmp_path / "adapter"))
    _lit.trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(module, _lit.loader())
    encoder = prefix_encoder(module.model)
    assert encoder.projecting and all(p.requires_grad for p in encoder.parameters())
    ids = torch.randint(0, _lit.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    module.model.eval()
    with torch.no_grad():
        expected = module.model(ids).logits
        base = _tiny.llama(hidden=32, vocab=_lit.VOCAB)
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        assert torch.equal(loaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("make", [_tiny.gpt2, _tiny.bert])
def test_a_prefix_that_leaves_no_position_for_the_input_is_refused(make):
    from lightning_peft import apply_prefix_tuning

    model = make()
    limit = model.config.max_position_embeddings
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"num_virtual_tokens={limit} leaves no room for the input"):
        apply_prefix_tuning(model, num_virtual_tokens=limit)
    assert model.state_dict().keys() == state.keys()
