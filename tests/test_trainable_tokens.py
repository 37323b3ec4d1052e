"""Trainable tokens: only the chosen embedding rows train (alone, or beside LoRA through
``trainable_token_indices``); files are HF PEFT's both ways; add_tokens extends a tokenizer and its
model with new rows at the mean of the old ones."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from torch import nn

from lightning_peft import (
    LoRAConfig,
    TrainableTokensConfig,
    TrainableTokensLayer,
    add_tokens,
    apply_lora,
    apply_trainable_tokens,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_parameters,
    unmerge_adapters,
)
from lightning_peft._base import adapter_named_parameters, has_adapters
from lightning_peft.methods import methods_in
from tests import _tiny

torch.set_num_threads(1)
VOCAB = 96
IDS = [3, 17, 58, 95]


def llama(tie: bool, seed: int = 0, vocab: int = VOCAB) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def batch(seed: int = 0, rows: int = 3, seq: int = 11) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))
    ids[0, :4] = torch.tensor(IDS)  # every chosen id occurs
    ids[1, 5] = IDS[1]
    return ids


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def train(model: nn.Module, steps: int = 3, lr: float = 5e-2) -> None:
    """AdamW with weight decay over every parameter (the frozen ones get no gradient)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for step in range(steps):
        ids = batch(step)
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.eval()


def perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapter_named_parameters(model):
            param.add_(torch.randn(param.shape, generator=g) * 0.3)


def ids_of(spec) -> list[int]:
    return spec if isinstance(spec, list) else next(iter(spec.values()))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


# ------------------------------------------------------------------------------ standalone


@pytest.mark.parametrize("tie", [False, True])
def test_fresh_layer_gives_the_base_model_bit_for_bit(tie):
    model = llama(tie)
    base = logits(model, batch())
    apply_trainable_tokens(model, token_indices=IDS)
    assert isinstance(model.model.embed_tokens, TrainableTokensLayer)
    assert isinstance(model.lm_head, TrainableTokensLayer) == tie  # a tied head follows the rows
    assert torch.equal(logits(model, batch()), base)
    assert trainable_parameters(model).trainable == len(IDS) * 32


@pytest.mark.parametrize("tie", [False, True])
def test_training_changes_only_the_chosen_rows(tie):
    model = llama(tie)
    before = state(model)
    apply_trainable_tokens(model, token_indices=IDS)
    layer = model.model.embed_tokens
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["model.embed_tokens.trainable_tokens_delta"]
    model.train()
    ids = batch()
    model(ids, labels=ids).loss.backward()
    assert layer.trainable_tokens_delta.grad.shape == (len(IDS), 32)  # no (vocab, d) gradient
    assert layer.base_layer.weight.grad is None
    model.zero_grad()
    train(model)
    after = {n.replace(".base_layer", ""): t for n, t in model.state_dict().items()}
    for name, tensor in before.items():  # every base tensor, the embedding included, bit for bit
        assert torch.equal(after[name], tensor), name
    assert not torch.equal(layer.trainable_tokens_delta, before["model.embed_tokens.weight"][IDS])
    merge_adapters(model)
    merged = layer.base_layer.weight.detach().clone()
    others = [i for i in range(VOCAB) if i not in IDS]
    assert torch.equal(merged[others], before["model.embed_tokens.weight"][others])  # other rows identical
    assert (merged[IDS] != before["model.embed_tokens.weight"][IDS]).any(dim=1).all()  # each new row moved
    unmerge_adapters(model)
    assert torch.equal(layer.base_layer.weight, before["model.embed_tokens.weight"])


@pytest.mark.parametrize("tie", [False, True])
def test_outputs_match_a_float64_reference_and_merge(tie):
    model = llama(tie)
    apply_trainable_tokens(model, token_indices=IDS)
    perturb(model)
    ids = batch()
    out = logits(model, ids)
    # reference: the embedding (and a tied head) with the chosen rows replaced, in float64
    ref = llama(tie).double()
    with torch.no_grad():
        ref.model.embed_tokens.weight[IDS] = model.model.embed_tokens.trainable_tokens_delta.double()
    assert torch.allclose(out.double(), logits(ref, ids), atol=1e-5, rtol=0)
    merge_adapters(model)
    assert model.model.embed_tokens.merged and (not tie or model.lm_head.merged)
    assert torch.allclose(logits(model, ids), out, atol=1e-5, rtol=0)
    unmerge_adapters(model)
    assert torch.equal(logits(model, ids), out)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_and_peft_both_ways(tmp_path, tie):
    model = llama(tie)
    apply_trainable_tokens(model, token_indices=IDS)
    perturb(model)
    ids = batch()
    out = logits(model, ids)
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == IDS
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    expected = ["base_model.model.model.embed_tokens.trainable_tokens_delta"]
    if tie:  # PEFT repeats the rows under the tied head
        expected.insert(0, "base_model.model.lm_head.trainable_tokens_delta")
    assert keys == expected
    other = load_adapter(llama(tie), tmp_path / "ours")
    assert torch.equal(logits(other, ids), out)
    theirs = peft.PeftModel.from_pretrained(llama(tie), str(tmp_path / "ours"))
    assert torch.allclose(logits(theirs, ids), out, atol=1e-5, rtol=0)

    # a file PEFT wrote loads here
    peft_model = peft.get_peft_model(llama(tie), peft.TrainableTokensConfig(token_indices=[5, 9, 60]))
    perturb(peft_model, seed=7)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = load_adapter(llama(tie), tmp_path / "peft")
    assert ours.model.embed_tokens.token_indices == [5, 9, 60]
    assert torch.allclose(logits(ours, ids), logits(peft_model, ids), atol=1e-5, rtol=0)


def test_bad_token_ids_are_refused_naming_them():
    for bad, words in (([], "non-empty"), ([3, 3, 5], r"more than once: \[3\]"), ([-1], "non-negative"),
                       ([2.0], "non-negative int"), (None, "non-empty")):
        with pytest.raises(ValueError, match=rf"^token_indices .*{words}"):
            TrainableTokensConfig(token_indices=bad)
    model = llama(False)
    before = state(model)
    with pytest.raises(ValueError, match=r"token_indices: token ids \[96, 200\] are out of range for "
                                         r"'model.embed_tokens', which has 96 rows"):
        apply_trainable_tokens(model, token_indices=[3, 96, 200])
    with pytest.raises(ValueError, match="target_modules entry 'nope' matches no module"):
        apply_trainable_tokens(model, token_indices=[3], target_modules=["nope"])
    with pytest.raises(ValueError, match="is a LlamaDecoderLayer"):
        apply_trainable_tokens(model, token_indices=[3], target_modules=["layers.0"])
    assert not has_adapters(model) and state(model).keys() == before.keys()
    assert all(torch.equal(t, before[n]) for n, t in state(model).items())
    # LoRA's option is checked the same way and names itself
    with pytest.raises(ValueError, match=r"^trainable_token_indices .*more than once"):
        LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[1, 1])
    with pytest.raises(ValueError, match=r"trainable_token_indices: token ids \[99\] are out of range"):
        apply_lora(model, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 99]})
    assert not has_adapters(model)


def test_other_ids_on_a_layer_that_trains_some_are_refused():
    model = llama(True)
    apply_trainable_tokens(model, token_indices=IDS)
    apply_trainable_tokens(model, token_indices=IDS)  # the same again: harmless
    with pytest.raises(ValueError, match="already trains token ids"):
        apply_trainable_tokens(model, token_indices=[1, 2])
    assert model.model.embed_tokens.token_indices == IDS


def test_a_failed_load_leaves_the_model_unchanged(tmp_path):
    model = llama(True)
    apply_trainable_tokens(model, token_indices=IDS)
    perturb(model)
    save_adapter(model, tmp_path / "a")
    small = llama(True, vocab=64)  # id 95 is out of range there
    before = state(small)
    with pytest.raises(ValueError, match=r"token ids \[95\] are out of range"):
        load_adapter(small, tmp_path / "a")
    assert not has_adapters(small) and all(torch.equal(t, before[n]) for n, t in state(small).items())
    # the rows the file repeats for the tied head must be the embedding's
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.lm_head.trainable_tokens_delta"] += 1.0
    save_file(tensors, str(weights))
    fresh = llama(True)
    before = state(fresh)
    with pytest.raises(ValueError, match="belong to one tied weight but hold different rows"):
        load_adapter(fresh, tmp_path / "a")
    assert not methods_in(fresh) and all(torch.equal(t, before[n]) for n, t in state(fresh).items())


# ------------------------------------------------------------------------------ beside LoRA


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("spec", [IDS, {"embed_tokens": IDS[:2]}])
def test_lora_with_trainable_tokens_round_trips_and_loads_in_peft_both_ways(tmp_path, tie, spec):
    model = llama(tie)
    ids = batch()
    base = logits(model, ids)
    apply_lora(model, r=2, target_modules=["q_proj", "v_proj"], trainable_token_indices=spec)
    assert torch.equal(logits(model, ids), base)
    perturb(model)
    out = logits(model, ids)
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    # the input embedding alone is written as PEFT's plain list, whichever form was given
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == IDS[:len(ids_of(spec))]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
    assert not any("lm_head" in k for k in keys)
    assert torch.equal(logits(load_adapter(llama(tie), tmp_path / "ours"), ids), out)
    theirs = peft.PeftModel.from_pretrained(llama(tie), str(tmp_path / "ours"))
    assert torch.allclose(logits(theirs, ids), out, atol=1e-5, rtol=0)

    peft_model = peft.get_peft_model(llama(tie), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                 trainable_token_indices=spec))
    perturb(peft_model, seed=8)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = load_adapter(llama(tie), tmp_path / "peft")
    assert torch.allclose(logits(ours, ids), logits(peft_model, ids), atol=1e-5, rtol=0)
    # loading into a model that carries another row set is refused, the model unchanged
    carrier = apply_lora(llama(tie), r=2, target_modules=["q_proj"], trainable_token_indices=[7])
    before = state(carrier)
    with pytest.raises(ValueError, match="trainable_token_indices"):
        load_adapter(carrier, tmp_path / "peft")
    assert all(torch.equal(t, before[n]) for n, t in state(carrier).items())


@pytest.mark.parametrize("tie", [False, True])
def test_lora_trains_only_the_rows_and_its_factors(tie):
    model = llama(tie)
    before = state(model)
    apply_lora(model, r=2, target_modules=["q_proj"], trainable_token_indices=IDS)
    train(model)
    merge_adapters(model)
    unmerge_adapters(model)
    after = {n.replace(".base_layer", ""): t for n, t in model.state_dict().items()}
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_modules_to_save_or_tokens_without_any_lora_target(tmp_path):
    model = llama(False)
    ids = batch()
    base = logits(model, ids)
    apply_lora(model, target_modules=[], modules_to_save=["lm_head"], trainable_token_indices=IDS)
    assert not any(type(m).__name__ == "LoRALinear" for m in model.modules())
    assert torch.equal(logits(model, ids), base)
    assert trainable_parameters(model).trainable == len(IDS) * 32 + VOCAB * 32
    perturb(model)
    out = logits(model, ids)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["modules_to_save"] == ["lm_head"]
    assert torch.equal(logits(load_adapter(llama(False), tmp_path / "a"), ids), out)
    with pytest.warns(UserWarning, match="No LoRA layer is injected"):
        apply_lora(llama(False), target_modules=["nothing"], modules_to_save=["lm_head"])
    fresh = llama(False)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(fresh, target_modules=["nothing"])  # nothing at all would train
    with pytest.raises(ValueError, match="nothing would train"):
        apply_lora(fresh, target_modules=[])
    assert not has_adapters(fresh)


def test_a_tied_head_cannot_get_lora_or_train_in_full_beside_its_rows():
    model = llama(True)
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(model, r=2, target_modules=["q_proj", "lm_head"], trainable_token_indices=IDS)
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(model, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                   trainable_token_indices=IDS)
    assert not has_adapters(model)


# ------------------------------------------------------------------------------ add_tokens


@pytest.mark.parametrize("tie", [False, True])
def test_add_tokens_sets_new_rows_to_the_mean_of_the_old_ones(tie):
    tok = _tiny.tokenizer(["alpha beta gamma delta", "the quick brown fox"], vocab_size=300)
    model = llama(tie, vocab=len(tok))
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    ids = add_tokens(model, tok, ["<rel:born_in>", "<rel:capital_of>"])
    assert ids == [len(tok) - 2, len(tok) - 1] and model.config.vocab_size == len(tok)
    assert tok.convert_ids_to_tokens(ids) == ["<rel:born_in>", "<rel:capital_of>"]
    assert tok("x <rel:born_in> y")["input_ids"].count(ids[0]) == 1  # one token, not split
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[: len(old_emb)], old_emb)
    mean = old_emb.double().mean(0).float()
    assert torch.equal(emb[ids], mean.expand(2, -1))
    head = model.get_output_embeddings().weight
    assert (head is emb) == tie
    if not tie:
        assert torch.equal(head[: len(old_head)], old_head)
        assert torch.equal(head[ids], old_head.double().mean(0).float().expand(2, -1))
    # then only the new rows train
    apply_trainable_tokens(model, token_indices=ids)
    assert trainable_parameters(model).trainable == 2 * 32


def test_add_tokens_refuses_known_or_repeated_tokens_and_changes_nothing():
    tok = _tiny.tokenizer(["alpha beta gamma delta"], vocab_size=300)
    model = llama(False, vocab=len(tok))
    size, before = len(tok), state(model)
    known = tok.convert_ids_to_tokens(5)
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        add_tokens(model, tok, ["<new>", known])
    with pytest.raises(ValueError, match="more than once"):
        add_tokens(model, tok, ["<new>", "<new>"])
    with pytest.raises(ValueError, match="non-empty list"):
        add_tokens(model, tok, "<new>")
    assert len(tok) == size and all(torch.equal(t, before[n]) for n, t in state(model).items())
    apply_trainable_tokens(model, token_indices=[1])
    with pytest.raises(ValueError, match="carries adapters already"):
        add_tokens(model, tok, ["<new>"])
    assert len(tok) == size


@pytest.mark.parametrize("tie", [False, True])
def test_unload_writes_the_rows_and_restores_plain_modules(tie):
    from lightning_peft.methods.trainable_tokens import unload_trainable_tokens

    model = llama(tie)
    original = model.model.embed_tokens
    apply_trainable_tokens(model, token_indices=IDS)
    perturb(model)
    ids = batch()
    out = logits(model, ids)
    rows = model.model.embed_tokens.trainable_tokens_delta.detach().clone()
    unload_trainable_tokens(model)
    assert model.model.embed_tokens is original and not has_adapters(model)
    assert (model.lm_head.weight is original.weight) == tie
    assert torch.equal(original.weight[IDS], rows)
    assert torch.allclose(logits(model, ids), out, atol=1e-5, rtol=0)


def test_rows_stay_float32_on_a_half_precision_base():
    from lightning_peft._base import restore_adapter_dtypes

    model = llama(True)
    apply_trainable_tokens(model, token_indices=IDS)
    model.to(torch.bfloat16)  # what Lightning's "bf16-true" does after injection
    assert restore_adapter_dtypes(model) == 1
    layer = model.model.embed_tokens
    assert layer.trainable_tokens_delta.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    ids = batch()
    model(ids, labels=ids).loss.backward()
    assert layer.trainable_tokens_delta.grad.dtype == torch.float32
    base = llama(True).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # fresh rows: the bf16 base exactly


def test_rows_of_an_untied_head_beside_the_embedding_and_peft_both_ways(tmp_path):
    spec = {"embed_tokens": [3, 17], "lm_head": [5, 90, 91]}
    model = apply_lora(llama(False), r=2, target_modules=["q_proj"], trainable_token_indices=spec)
    assert model.lm_head.token_indices == [5, 90, 91] and not model.lm_head._tied
    perturb(model)
    ids = batch()
    out = logits(model, ids)
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == spec
    theirs = peft.PeftModel.from_pretrained(llama(False), str(tmp_path / "ours"))
    assert torch.allclose(logits(theirs, ids), out, atol=1e-5, rtol=0)
    peft_model = peft.get_peft_model(llama(False), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                   trainable_token_indices=spec))
    perturb(peft_model, seed=5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = load_adapter(llama(False), tmp_path / "peft")
    assert torch.allclose(logits(ours, ids), logits(peft_model, ids), atol=1e-5, rtol=0)
    # a tied head must follow the embedding's rows: other ids for it are refused
    with pytest.raises(ValueError, match="shares its weight with 'model.embed_tokens' but is given other"):
        apply_lora(llama(True), r=2, target_modules=["q_proj"], trainable_token_indices=spec)


def test_callback_checkpoints_only_the_rows_resumes_and_writes_the_adapter(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft import TrainableTokensCallback
    from tests import _lit

    ids_ = [1, 5, 7, 42]
    module = _lit.TinyLM()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="rows", every_n_train_steps=3, save_top_k=-1)
    callback = TrainableTokensCallback(token_indices=ids_, adapter_dir=str(tmp_path / "adapter"))
    _lit.trainer(tmp_path, callbacks=[callback, saver], enable_checkpointing=True).fit(module, _lit.loader())
    state = torch.load(tmp_path / "rows.ckpt", weights_only=True)["state_dict"]
    assert list(state) == ["model.model.embed_tokens.trainable_tokens_delta"]
    assert state["model.model.embed_tokens.trainable_tokens_delta"].shape == (4, 32)
    resumed = _lit.TinyLM()
    _lit.trainer(tmp_path, callbacks=[TrainableTokensCallback(token_indices=ids_)], max_steps=3).fit(
        resumed, _lit.loader(), ckpt_path=tmp_path / "rows.ckpt")
    x = batch()
    assert torch.equal(logits(resumed.model, x), logits(module.model, x))
    # a checkpoint of other rows is refused
    other = _lit.TinyLM()
    with pytest.raises(ValueError, match="token_indices"):
        _lit.trainer(tmp_path, callbacks=[TrainableTokensCallback(token_indices=[1, 2])], max_steps=3).fit(
            other, _lit.loader(), ckpt_path=tmp_path / "rows.ckpt")
    fresh = load_adapter(_tiny.llama(), tmp_path / "adapter")
    assert torch.equal(logits(fresh, x), logits(module.model, x))
    # merge_on_fit_end writes the rows into the embedding
    merged = _lit.TinyLM()
    merging = TrainableTokensCallback(token_indices=ids_, merge_on_fit_end=True)
    _lit.trainer(tmp_path, callbacks=[merging]).fit(merged, _lit.loader())
    assert merged.model.model.embed_tokens.merged
    weight = merged.model.model.embed_tokens.base_layer.weight
    assert torch.equal(weight[ids_], merged.model.model.embed_tokens.trainable_tokens_delta.detach())


def test_lora_callback_trains_the_rows_beside_lora(tmp_path):
    from lightning_peft import LoRACallback
    from tests import _lit

    module = _lit.TinyLM()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    callback = LoRACallback(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 5, 7, 42],
                            adapter_dir=str(tmp_path / "adapter"))
    _lit.trainer(tmp_path, callbacks=[callback]).fit(module, _lit.loader())
    owned = dict(adapter_named_parameters(module.model))
    assert "model.embed_tokens.trainable_tokens_delta" in owned and len(owned) == 5
    after = {n.replace(".base_layer", ""): p for n, p in module.model.named_parameters()}
    assert all(torch.equal(after[n], p) for n, p in before.items())  # the base, bit for bit
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == [1, 5, 7, 42]
    x = batch()
    assert torch.equal(logits(load_adapter(_tiny.llama(), tmp_path / "adapter"), x), logits(module.model, x))


@pytest.mark.parametrize("merge", [False, True])
def test_disable_adapters_also_runs_the_original_rows(merge):
    from lightning_peft import disable_adapters

    model = llama(True)
    ids = batch()
    base = logits(model, ids)
    apply_lora(model, r=2, target_modules=["q_proj"], trainable_token_indices=IDS)
    perturb(model)
    if merge:
        merge_adapters(model)
    out = logits(model, ids)
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    assert model.model.embed_tokens.merged == merge
    assert torch.equal(logits(model, ids), out)


def test_add_tokens_into_a_padded_embedding_uses_its_spare_rows():
    tok = _tiny.tokenizer(["alpha beta gamma delta"], vocab_size=300)
    model = llama(False, vocab=len(tok) + 8)  # an embedding padded beyond the tokenizer
    old = model.get_input_embeddings().weight.detach().clone()
    ids = add_tokens(model, tok, ["<a>", "<b>"])
    assert ids == [len(tok) - 2, len(tok) - 1]
    emb = model.get_input_embeddings().weight
    assert emb.shape == old.shape  # no resize: the new ids fall in the spare rows
    mean = old[: len(tok) - 2].double().mean(0).float()  # the rows of the tokens it had
    assert torch.equal(emb[ids], mean.expand(2, -1))
    others = [i for i in range(old.shape[0]) if i not in ids]
    assert torch.equal(emb[others], old[others])


@pytest.mark.parametrize("lora", [False, True])
def test_t5_embeddings_sharing_one_weight_all_take_the_rows_and_peft_both_ways(tmp_path, lora):
    """T5's ``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens`` are three modules
    over one weight (and the head is tied): all of them take the trained rows, as HF PEFT wraps
    them, so merging is exact and files load both ways with the same outputs (only ``shared``
    was wrapped: the encoder and decoder read the untrained rows, and merging changed the
    outputs by about 3.6)."""
    def t5():
        torch.manual_seed(0)
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8, vocab_size=64,
            decoder_start_token_id=0)).eval()

    ids, dec = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 9]]), torch.tensor([[0, 5, 6], [0, 9, 10]])

    def out(model):
        with torch.no_grad():
            return model(input_ids=ids, decoder_input_ids=dec).logits

    def apply(model):
        if lora:
            return apply_lora(model, r=2, target_modules=["q"], trainable_token_indices=[5, 9])
        return apply_trainable_tokens(model, token_indices=[5, 9])

    model = apply(t5())
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, TrainableTokensLayer))
    assert wrapped == ["decoder.embed_tokens", "encoder.embed_tokens", "lm_head", "shared"]
    perturb(model)
    trained = out(model)
    merge_adapters(model)
    torch.testing.assert_close(out(model), trained, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(t5(), str(tmp_path / "ours"))
    torch.testing.assert_close(out(theirs), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out(load_adapter(t5(), tmp_path / "ours")), trained, rtol=0, atol=0)

    config = (peft.LoraConfig(r=2, target_modules=["q"], trainable_token_indices=[5, 9]) if lora
              else peft.TrainableTokensConfig(token_indices=[5, 9]))
    peft_model = peft.get_peft_model(t5(), config)
    perturb(peft_model, seed=8)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    torch.testing.assert_close(out(load_adapter(t5(), tmp_path / "peft")), out(peft_model),
                               rtol=1e-5, atol=1e-5)


def test_the_two_stages_need_the_first_unloaded_and_say_so():
    """Stage 2 (LoRA with ``trainable_token_indices``) on a model that still carries stage 1's
    layer is refused naming ``unload_trainable_tokens`` (it said the same ids conflicted with
    themselves); after unloading, stage 2 starts from the trained rows."""
    from lightning_peft import unload_trainable_tokens

    model = apply_trainable_tokens(llama(False), token_indices=IDS)
    perturb(model)
    ids = batch()
    trained = logits(model, ids)
    before = state(model)
    with pytest.raises(ValueError, match=r"trainable-tokens adapter of its own; unload_trainable_tokens"):
        apply_lora(model, r=2, target_modules=["q_proj"], trainable_token_indices=IDS)
    assert all(torch.equal(t, before[n]) for n, t in state(model).items())
    model = unload_trainable_tokens(model)
    apply_lora(model, r=2, target_modules=["q_proj"], trainable_token_indices=IDS)
    assert torch.allclose(logits(model, ids), trained, atol=1e-6, rtol=0)
