"""LoRAHub (arXiv 2307.13269): the stacked combination is Σ w_i s_i B_i A_i, the search beats the
uniform mix on a constructed task (labels from a teacher: the base model with one of the adapters),
the result saves and loads as a plain LoRA, bad input is refused before the model changes."""

import json
import sys

import pytest
import torch

from lightning_peft import LoRAHubResult, apply_ia3, apply_lora, load_adapter, lorahub, save_adapter
from lightning_peft._base import AdapterLayer
from lightning_peft.lorahub import _Combination, _read_lora, lorahub_combine
from lightning_peft.methods.lora import LoRALinear
from tests import _tiny

pytest.importorskip("nevergrad")

MOD = 24  # the synthetic tasks map tokens 0..MOD-1


def _chain_batch(f, n: int, length: int, generator: torch.Generator) -> dict:
    """Sequences x, f(x), f(f(x)), ...: every token after the first is scored."""
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, MOD, (n,), generator=generator)
    for t in range(1, length):
        ids[:, t] = f(ids[:, t - 1])
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


TASKS = {"plus": lambda x: (x + 1) % MOD, "times": lambda x: (5 * x + 3) % MOD}


def _random_adapter(model_fn, directory, r, alpha, seed, targets=None, **kw):
    model = model_fn()
    apply_lora(model, r=r, alpha=alpha, target_modules=targets, **kw)
    _tiny.randomize_lora(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g))
    save_adapter(model, directory)
    return directory


def _sharp_llama():
    """The tiny Llama with its output layer scaled up, so its next-token distributions are peaked
    (a random init's are nearly uniform) and two adapters make two clearly different tasks."""
    model = _tiny.llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two adapters of mixed ranks (4 and 2) standing for two tasks: each task's labels are the
    greedy next tokens of the base model carrying that adapter (a teacher)."""
    root = tmp_path_factory.mktemp("lorahub")
    return (_random_adapter(_sharp_llama, root / "first", 4, 8.0, 1, "all-linear"),
            _random_adapter(_sharp_llama, root / "second", 2, 3.0, 2, "all-linear"))


def _task_batch(directory, n: int, length: int, generator: torch.Generator) -> dict:
    """Random token sequences labelled with the next tokens the adapter in ``directory`` predicts."""
    teacher = lorahub_combine(_sharp_llama(), [directory], [1.0])
    ids = torch.randint(0, 96, (n, length), generator=generator)
    with torch.no_grad():
        predicted = teacher(input_ids=ids).logits.argmax(-1)  # (n, length): the token after each
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = predicted[:, :-1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _update64(directory) -> dict[str, torch.Tensor]:
    """``{module: s·B·A}`` in float64, from the files (Conv1D layout not applied)."""
    return {p: sb @ a for p, (a, sb) in _read_lora(directory).factors.items()}


@pytest.mark.parametrize("model_fn,targets", [(_tiny.llama, "all-linear"), (_tiny.gpt2, ["c_attn", "c_fc"])])
def test_stacked_combination_equals_weighted_sum_of_updates(tmp_path, model_fn, targets):
    dirs = [_random_adapter(model_fn, tmp_path / "a", 3, 6.0, 1, targets),
            _random_adapter(model_fn, tmp_path / "b", 1, 5.0, 2, targets, use_rslora=True),
            _random_adapter(model_fn, tmp_path / "c", 2, 1.0, 3, targets)]
    updates = [_update64(d) for d in dirs]
    model = model_fn()
    adapters = [_read_lora(d) for d in dirs]
    combination = _Combination(model, sorted(updates[0]), adapters)
    for weights in ([0.3, -1.2, 0.7], [1.5, 0.0, -0.25]):
        combination.set_weights(weights)
        for path in updates[0]:
            layer = model.get_submodule(path)
            assert isinstance(layer, LoRALinear) and layer.r == 6 and layer.scaling == 1.0
            expected = sum(w * u[path] for w, u in zip(weights, updates))  # (out, in) float64
            got = (layer.lora_B.double() @ layer.lora_A.double()) * layer.scaling
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
            delta = layer.delta_weight().double()
            torch.testing.assert_close(delta.t() if layer.fan_in_fan_out else delta, expected,
                                       rtol=1e-5, atol=1e-5)
    # lorahub_combine: the same combination with known weights, into a fresh model
    fresh = lorahub_combine(model_fn(), dirs, [1.5, 0.0, -0.25])
    ids = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="weights must be 3 finite numbers"):
        lorahub_combine(model_fn(), dirs, [1.0, 2.0])


def test_lorahub_beats_the_uniform_mix_and_round_trips(trained, tmp_path):
    g = torch.Generator().manual_seed(7)
    examples = [_task_batch(trained[0], 5, 8, g) for _ in range(2)]  # 10 examples of the first task
    model = _sharp_llama()
    result = lorahub(model, trained, examples, budget=40, seed=0)
    assert isinstance(result, LoRAHubResult)
    assert len(result.weights) == 2 and all(-1.5 <= w <= 1.5 for w in result.weights)
    assert result.loss_after < result.loss_before - 1.0, result
    assert result.loss_before < result.loss_base
    assert result.weights[0] > result.weights[1] + 0.5  # the first task's adapter dominates
    assert 1 <= len(result.history) <= 41
    best = min(h["objective"] for h in result.history)
    chosen = result.loss_after + 0.05 * sum(abs(w) for w in result.weights)
    assert chosen == pytest.approx(best)
    # the model carries the combination: its loss is loss_after
    with torch.no_grad():
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in examples)
        total = sum(float(model(**b).loss) * int((b["labels"][:, 1:] != -100).sum()) for b in examples)
    assert total / tokens == pytest.approx(result.loss_after, rel=1e-5)
    # a plain PEFT LoRA of rank 4 + 2, scaling 1
    save_adapter(model, tmp_path / "hub")
    config = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 6 and config["lora_alpha"] == 6
    fresh = load_adapter(_sharp_llama(), tmp_path / "hub")
    ids = examples[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    # deterministic in the seed
    again = lorahub(_sharp_llama(), trained, examples, budget=40, seed=0)
    assert again.weights == result.weights


def test_records_with_a_tokenizer_are_encoded_as_training_does(tmp_path):
    from lightning_peft.data import collate, encode_example

    records = [{"instruction": "Add one.", "input": f"{i}", "output": f"{i + 1}"} for i in range(5)]
    tok = _tiny.tokenizer([r["instruction"] + r["input"] + r["output"] for r in records], vocab_size=300)
    vocab = len(tok)
    make = lambda: _tiny.llama(vocab=vocab)  # noqa: E731
    dirs = [_random_adapter(make, tmp_path / n, 2, 4.0, s, ["q_proj", "v_proj"])
            for n, s in (("a", 1), ("b", 2))]
    from_records = lorahub(make(), dirs, records, tokenizer=tok, batch_size=2, budget=3)
    batches = [collate([encode_example(tok, r) for r in records[i:i + 2]], tok.pad_token_id)
               for i in range(0, 5, 2)]
    assert (batches[0]["labels"][0] == -100).sum() > 0  # the prompt is masked
    from_batches = lorahub(make(), dirs, batches, budget=3)
    assert from_records.loss_before == pytest.approx(from_batches.loss_before, rel=1e-6)
    assert from_records.loss_base == pytest.approx(from_batches.loss_base, rel=1e-6)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_input_is_refused_with_the_model_unchanged(tmp_path):
    good = _random_adapter(_tiny.llama, tmp_path / "good", 2, 4.0, 1, ["q_proj", "v_proj"])
    other_targets = _random_adapter(_tiny.llama, tmp_path / "other", 2, 4.0, 2, ["q_proj", "k_proj"])
    other_base = _random_adapter(lambda: _tiny.llama(hidden=48), tmp_path / "wide", 2, 4.0, 3,
                                 ["q_proj", "v_proj"])
    ia3 = _tiny.llama()
    apply_ia3(ia3)
    save_adapter(ia3, tmp_path / "ia3")
    (tmp_path / "empty").mkdir()
    batch = _chain_batch(TASKS["plus"], 3, 6, torch.Generator().manual_seed(0))
    model = _tiny.llama()
    for p in model.parameters():
        p.requires_grad_(True)
    before = _snapshot(model)
    cases = [
        ([good, tmp_path / "empty"], [batch], FileNotFoundError, "not an adapter directory"),
        ([good, tmp_path / "ia3"], [batch], ValueError, "IA3 adapter, not LoRA"),
        ([good, other_targets], [batch], ValueError, r"other.*targets other modules.*k_proj"),
        ([good, other_base], [batch], ValueError, r"wide.*another base model"),
        ([good], [], ValueError, "examples is empty"),
        ([], [batch], ValueError, "adapter_dirs is empty"),
        ([good], [{"instruction": "x", "output": "y"}], ValueError, "pass tokenizer="),
        ([good], [{"input_ids": batch["input_ids"]}], ValueError, "no 'labels'"),
        # encoded but not collated (lists), and one example's 1-D tensors: named, not a model error
        ([good], [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], ValueError,
         r"examples\[0\]\['input_ids'\] must be a 2-D tensor .* got list"),
        ([good], [{k: v[0] for k, v in batch.items()}], ValueError,
         r"examples\[0\]\['input_ids'\] must be a 2-D tensor .* got shape \(6,\)"),
        ([good], [{**batch, "labels": batch["labels"][:, :-1]}], ValueError,
         r"examples\[0\]\['labels'\] must be a 2-D tensor"),
    ]
    for dirs, examples, error, match in cases:
        with pytest.raises(error, match=match):
            lorahub(model, dirs, examples, budget=2)
        _assert_unchanged(model, before)
    for kwargs, match in (({"budget": 0}, "budget"), ({"l1": -1.0}, "l1"), ({"seed": -1}, "seed")):
        with pytest.raises(ValueError, match=match):
            lorahub(model, [good], [batch], **kwargs)
    _assert_unchanged(model, before)
    carrying = _tiny.llama()
    apply_lora(carrying, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already carries adapter layers"):
        lorahub(carrying, [good], [batch], budget=2)


def test_a_search_that_fails_part_way_leaves_the_model_unchanged(tmp_path):
    """An exception in ``loss_fn`` on its fourth call (after the combined LoRA was injected) leaves
    the model exactly as it was: no LoRA layers, the same modules, tensors and ``requires_grad``."""
    good = _random_adapter(_tiny.llama, tmp_path / "good", 2, 4.0, 1, ["q_proj", "v_proj"])
    batch = _chain_batch(TASKS["plus"], 3, 6, torch.Generator().manual_seed(0))
    model = _tiny.llama()
    before = _snapshot(model)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("out of memory")
        return model(**batch).loss

    with pytest.raises(RuntimeError, match="out of memory"):
        lorahub(model, [good], [batch], loss_fn=loss_fn, budget=5)
    assert len(calls) == 4
    _assert_unchanged(model, before)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_missing_nevergrad_names_the_install(monkeypatch, tmp_path):
    good = _random_adapter(_tiny.llama, tmp_path / "good", 2, 4.0, 1, ["q_proj"])
    monkeypatch.setitem(sys.modules, "nevergrad", None)
    batch = _chain_batch(TASKS["plus"], 2, 5, torch.Generator().manual_seed(0))
    with pytest.raises(ImportError, match="pip install nevergrad"):
        lorahub(_tiny.llama(), [good], [batch])
