"""FishMask (arXiv 2111.09839): exactly the k weights with the largest empirical Fisher
information train, as k values beside the frozen base; nothing else changes, files hold only the
indices and values, and loading checks the indices."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lightning_peft import (
    FishMaskConfig,
    SparseUpdate,
    apply_fishmask,
    fishmask_scores,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_parameters,
    unmerge_adapters,
)
from lightning_peft._base import ModulesToSave, adapter_named_parameters, has_adapters
from lightning_peft.methods import apply_peft, get_method, method_for_peft_type
from lightning_peft.methods.fishmask import (
    fishmask_from_json,
    fishmask_layers,
    fishmask_to_json,
    select_fishmask,
)
from tests import _tiny


def _ids(seed: int = 0, batch: int = 3, seq: int = 10, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _lm_batches(n: int = 3, vocab: int = 96) -> list[torch.Tensor]:
    return [_ids(10 + i, batch=2, seq=8, vocab=vocab) for i in range(n)]


def _lm_loss(model: nn.Module):
    return lambda ids: model(ids, labels=ids).loss


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _random_scores(model: nn.Module, seed: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


def _selection(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.<param>": indices}`` of the FishMask layers of ``model``."""
    return {f"{n}.{p}": m.indices(p) for n, m in fishmask_layers(model) for p in m.param_names}


def _dense(base: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of the plain ``base`` model with ``model``'s FishMask values written in."""
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in fishmask_layers(model):
            for p in layer.param_names:
                w = dense.get_submodule(name)._parameters[p]
                w.view(-1)[layer.indices(p)] = layer.values(p).to(w.dtype)
    return dense


def _perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapter_named_parameters(model):
            param.add_(torch.randn(param.shape, generator=g).to(param.dtype) * 0.1)


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, arg", [
    (dict(keep=0), "keep"), (dict(keep=-0.1), "keep"), (dict(keep=1.5), "keep"),
    (dict(keep=float("nan")), "keep"), (dict(keep=True), "keep"), (dict(keep="0.1"), "keep"),
    (dict(fisher_batches=0), "fisher_batches"), (dict(fisher_batches=-2), "fisher_batches"),
    (dict(fisher_batches=1.5), "fisher_batches"), (dict(target_modules=""), "target_modules"),
    (dict(exclude_modules="("), "exclude_modules"), (dict(trainable_modules=[""]), "trainable_modules"),
])
def test_bad_arguments_name_them(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        FishMaskConfig(**kwargs)
    with pytest.raises(ValueError, match=f"^{arg}"):
        apply_fishmask(_tiny.llama(), fisher={}, **kwargs)
    from lightning_peft.callbacks import FishMaskCallback

    with pytest.raises(ValueError, match=f"^{arg}"):
        FishMaskCallback(**kwargs)


def test_without_scores_or_batches_the_error_says_what_to_pass():
    model = _tiny.llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: apply_fishmask(model), lambda: apply_peft(model, FishMaskConfig()),
                 lambda: apply_fishmask(model, batches=_lm_batches())):
        with pytest.raises(ValueError, match="pass fisher=.*or batches= and loss_fn="):
            call()
    with pytest.raises(ValueError, match="not both"):
        apply_fishmask(model, fisher=_random_scores(model), batches=_lm_batches(), loss_fn=_lm_loss(model))
    with pytest.raises(ValueError, match="fisher has no scores"):
        apply_fishmask(model, fisher={"lm_head.weight": torch.rand(96, 32)})
    with pytest.raises(ValueError, match="does not have"):
        apply_fishmask(model, fisher={**_random_scores(model), "nope.weight": torch.rand(3)})
    with pytest.raises(ValueError, match="target_modules entry 'nope'"):
        apply_fishmask(model, fisher=_random_scores(model), target_modules=["q_proj", "nope"])
    with pytest.raises(ValueError, match="trainable_modules entry 'nope'"):
        apply_fishmask(model, fisher=_random_scores(model), trainable_modules=["nope"])
    assert not has_adapters(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------


def test_selects_exactly_k_entries_the_top_k_fisher():
    model = _tiny.llama(seed=1)
    batches = _lm_batches(3)
    scores = fishmask_scores(model, batches, _lm_loss(model), FishMaskConfig())
    params = dict(model.named_parameters())
    assert set(scores) == set(params)  # llama: no tied weights, every parameter is a candidate
    # against torch.autograd.grad squared directly
    names = sorted(params)
    ref = {n: torch.zeros_like(params[n]) for n in names}
    for ids in batches:
        grads = torch.autograd.grad(model(ids, labels=ids).loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            ref[n] += g.square() / len(batches)
    for n in names:
        torch.testing.assert_close(scores[n], ref[n], rtol=1e-5, atol=1e-12)

    keep = 0.003
    total = sum(p.numel() for p in params.values())
    k = max(1, round(keep * total))
    apply_fishmask(model, keep=keep, batches=batches, loss_fn=_lm_loss(model))
    chosen = _selection(model)
    assert sum(i.numel() for i in chosen.values()) == k
    flat = torch.cat([ref[n].reshape(-1) for n in names])
    mask = torch.cat([torch.zeros(params[n].numel(), dtype=torch.bool).index_fill_(
        0, chosen[n], True) if n in chosen else torch.zeros(params[n].numel(), dtype=torch.bool)
        for n in names])
    assert int(mask.sum()) == k
    assert float(flat[mask].min()) >= float(flat[~mask].max())  # the top k, globally
    assert trainable_parameters(model).trainable == k
    for idx in chosen.values():
        assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())


def test_applying_twice_returns_the_model_as_is_and_keep_one_selects_everything():
    model = _tiny.llama()
    apply_fishmask(model, fisher=_random_scores(model), keep=1.0)
    before = _selection(model)
    assert sum(i.numel() for i in before.values()) == sum(
        p.numel() for n, p in _tiny.llama().named_parameters())
    assert apply_fishmask(model, fisher=_random_scores(model, seed=9), keep=1.0) is model
    with pytest.raises(ValueError, match="already carries FishMask with keep=1.0"):
        apply_fishmask(model, fisher=_random_scores(model, seed=9), keep=0.5)  # not silently ignored
    after = _selection(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_target_and_exclude_modules_restrict_the_candidates():
    model = _tiny.llama()
    apply_fishmask(model, fisher=_random_scores(model), keep=0.5, target_modules=["q_proj", "v_proj"],
                   exclude_modules=r"model\.layers\.1\..*")
    assert sorted(_selection(model)) == ["model.layers.0.self_attn.q_proj.weight",
                                         "model.layers.0.self_attn.v_proj.weight"]
    regex = _tiny.llama()
    apply_fishmask(regex, fisher=_random_scores(regex), keep=1.0, target_modules=r".*norm")
    assert all(n.endswith("norm.weight") for n in _selection(regex))


def test_tied_embeddings_are_never_candidates():
    model = _tiny.gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    scores = fishmask_scores(model, [_ids(1, 2, 8, 50)], _lm_loss(model), FishMaskConfig())
    assert "transformer.wte.weight" not in scores and "lm_head.weight" not in scores
    apply_fishmask(model, fisher=scores, keep=1.0)
    assert not isinstance(model.transformer.wte, SparseUpdate) and not isinstance(model.lm_head, SparseUpdate)
    assert model.lm_head.weight is model.transformer.wte.weight and not model.lm_head.weight.requires_grad


# --------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_a_dense_reference_and_a_fresh_mask_is_the_base(dtype):
    ids = _ids()
    base = _tiny.llama(seed=2).to(dtype)
    model = copy.deepcopy(base)
    apply_fishmask(model, fisher=_random_scores(model), keep=0.05)
    assert torch.equal(_logits(model, ids), _logits(base, ids))  # fresh: the base bit for bit
    _perturb(model)
    assert all(p.dtype == dtype for _, p in adapter_named_parameters(model))
    out = _logits(model, ids)
    assert not torch.equal(out, _logits(base, ids))
    assert torch.equal(out, _logits(_dense(base, model), ids))
    for _, layer in fishmask_layers(model):  # reset_parameters: back to W0's entries
        layer.reset_parameters()
    assert torch.equal(_logits(model, ids), _logits(base, ids))


def test_gradients_reach_only_the_values():
    layer = nn.Linear(5, 4)
    wrapped = SparseUpdate(layer, {"weight": torch.tensor([0, 7, 19]), "bias": torch.tensor([2])})
    for p in layer.parameters():
        p.requires_grad_(False)
    wrapped(torch.randn(3, 5)).square().sum().backward()
    assert wrapped.values("weight").grad.shape == (3,) and wrapped.values("bias").grad.shape == (1,)
    assert layer.weight.grad is None and layer.bias.grad is None
    for bad, match in ((torch.tensor([3, 3]), "strictly increase"), (torch.tensor([20]), r"\[0, 20\)"),
                       (torch.tensor([[1]]), "1-D")):
        with pytest.raises(ValueError, match=match):
            SparseUpdate(nn.Linear(5, 4), {"weight": bad})
    with pytest.raises(ValueError, match="no direct parameters"):
        SparseUpdate(nn.Linear(5, 4), {"scale": torch.tensor([0])})
    assert wrapped.file_key("fishmask_values_weight") == "weight.fishmask_values"
    assert wrapped.file_key("fishmask_indices_bias") == "bias.fishmask_indices"
    assert set(wrapped.adapter_buffers()) == {"fishmask_indices_weight", "fishmask_indices_bias"}


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_training_changes_only_the_selected_entries_and_lowers_the_loss(opt):
    base = _tiny.llama(seed=1)
    model = copy.deepcopy(base)
    batches = _lm_batches(2)
    apply_fishmask(model, keep=0.01, batches=batches, loss_fn=_lm_loss(model))
    k = sum(i.numel() for i in _selection(model).values())
    assert trainable_parameters(model).trainable == k
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2) if opt == "adam" else \
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = batches[0]
    losses = []
    model.train()
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    assert losses[-1] < losses[0]
    chosen = _selection(model)
    merge_adapters(model)
    changed = 0
    assert all(layer.merged for _, layer in fishmask_layers(model))
    merged = {n.replace(".base_layer", ""): p for n, p in model.named_parameters()
              if "fishmask_values" not in n}
    for name, w0 in base.named_parameters():
        w = merged[name]
        differ = (w != w0).reshape(-1).nonzero().squeeze(1)
        allowed = chosen.get(name, torch.empty(0, dtype=torch.int64))
        assert bool(torch.isin(differ, allowed).all()), f"{name} changed outside the mask"
        changed += differ.numel()
    assert changed > 0
    unmerge_adapters(model)
    for name, w0 in base.named_parameters():
        assert torch.equal(dict(model.named_parameters())[_wrapped_name(model, name)], w0)


def _wrapped_name(model: nn.Module, name: str) -> str:
    path, _, p = name.rpartition(".")
    return f"{path}.base_layer.{p}" if isinstance(model.get_submodule(path), SparseUpdate) else name


def test_merge_and_unmerge_are_exact_and_the_flag_tells_the_truth():
    ids = _ids()
    model = _tiny.llama(seed=2)
    apply_fishmask(model, fisher=_random_scores(model), keep=0.05)
    _perturb(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _logits(model, ids)
    merge_adapters(model)
    assert all(m.merged for _, m in fishmask_layers(model))
    assert torch.equal(_logits(model, ids), before)
    with pytest.warns(UserWarning, match="already merged"):
        fishmask_layers(model)[0][1].merge()
    unmerge_adapters(model)
    assert not any(m.merged for _, m in fishmask_layers(model))
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters() if n in w0)
    assert torch.equal(_logits(model, ids), before)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_save_holds_only_indices_and_values_and_loads_into_a_fresh_model(tmp_path):
    from safetensors.torch import load_file

    ids = _ids()
    model = _tiny.llama(seed=2)
    apply_fishmask(model, fisher=_random_scores(model), keep=0.02)
    _perturb(model)
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    chosen = _selection(model)
    expected = {f"base_model.model.{n}.fishmask_{kind}" for n in chosen for kind in ("indices", "values")}
    assert set(tensors) == expected
    for n, idx in chosen.items():
        assert torch.equal(tensors[f"base_model.model.{n}.fishmask_indices"], idx)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "FISHMASK" and method_for_peft_type("FISHMASK") is get_method("fishmask")
    assert config["keep"] == 0.02 and config["trainable_modules"] is None
    assert config["counts"] == {n: idx.numel() for n, idx in chosen.items()}
    other = _tiny.llama(seed=2)
    load_adapter(other, tmp_path)
    assert torch.equal(_logits(other, ids), _logits(model, ids))
    assert fishmask_to_json(other) == fishmask_to_json(model)
    assert trainable_parameters(other).trainable == sum(config["counts"].values())
    # into a model that carries another FishMask: refused, nothing changed
    another = _tiny.llama(seed=2)
    apply_fishmask(another, fisher=_random_scores(another, seed=8), keep=0.02)
    with pytest.raises(ValueError, match="counts differ"):
        load_adapter(another, tmp_path)
    # into a model that already carries the same adapter shape: indices and values replaced
    fresh = _tiny.llama(seed=2)
    fishmask_from_json(fresh, config, "cfg")(fresh)
    load_adapter(fresh, tmp_path)
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))


@pytest.mark.parametrize("problem, match", [
    ("out_of_range", r"must lie in \[0, "), ("negative", r"must lie in \[0, "),
    ("repeated", "strictly increase"), ("unsorted", "strictly increase"),
])
def test_a_file_with_bad_indices_is_refused_leaving_the_model_unchanged(tmp_path, problem, match):
    from safetensors.torch import load_file, save_file

    model = _tiny.llama(seed=2)
    apply_fishmask(model, fisher=_random_scores(model), keep=0.02)
    save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in sorted(tensors) if k.endswith("fishmask_indices") and tensors[k].numel() >= 2)
    idx = tensors[key].clone()
    numel = model.get_submodule(key[len("base_model.model."):-len(".weight.fishmask_indices")]) \
        .base_layer.weight.numel()
    if problem == "out_of_range":
        idx[-1] = numel
    elif problem == "negative":
        idx[0] = -1
    elif problem == "repeated":
        idx[1] = idx[0]
    else:
        idx[[0, 1]] = idx[[1, 0]]
    tensors[key] = idx
    save_file(tensors, str(weights), metadata={"format": "pt"})  # no record of the config: loads
    for victim in (_tiny.llama(seed=2), model):
        state = {k: v.clone() for k, v in victim.state_dict().items()}
        structure = [(n, type(m)) for n, m in victim.named_modules()]
        with pytest.raises(ValueError, match=match):
            load_adapter(victim, tmp_path)
        assert [(n, type(m)) for n, m in victim.named_modules()] == structure
        assert all(torch.equal(v, state[k]) for k, v in victim.state_dict().items())


@pytest.mark.parametrize("edit, match", [
    (dict(counts={}), "counts must be a non-empty"),
    (dict(counts={"lm_head.weight": 0}), r"counts\['lm_head.weight'\] must be an integer >= 1"),
    (dict(counts={"lm_head.weight": 10**9}), "entries"),
    (dict(counts={"nope.weight": 3}), "no module 'nope'"),
    (dict(counts={"lm_head.scale": 3}), "no floating-point parameter 'scale'"),
    (dict(keep=2), "keep must be a number in"),
    (dict(trainable_modules="lm_head"), "trainable_modules must be a list"),
    (dict(trainable_modules=["lm_head"]), "inside trainable_modules"),
    (dict(extra=1), "unknown FishMask config fields"),
])
def test_from_json_checks_every_field_and_names_it(edit, match):
    model = _tiny.llama()
    config = {"peft_type": "FISHMASK", "keep": 0.01, "counts": {"lm_head.weight": 3},
              "trainable_modules": None, **edit}
    with pytest.raises(ValueError, match=f"^cfg: .*{match}"):
        fishmask_from_json(model, config, "cfg")
    assert not has_adapters(model)


# --------------------------------------------------------------------------------------------
# GPT-2 (Conv1D) and BERT with a head trained in full
# --------------------------------------------------------------------------------------------


def test_gpt2_conv1d_trains_saves_and_loads(tmp_path):
    ids = _ids(vocab=50)
    base = _tiny.gpt2(seed=1)
    model = copy.deepcopy(base)
    apply_fishmask(model, keep=0.05, batches=[_ids(5, 2, 8, 50)], loss_fn=_lm_loss(model),
                   target_modules="all-linear")
    kinds = {type(m.base_layer).__name__ for _, m in fishmask_layers(model)}
    assert kinds == {"Conv1D"}
    assert torch.equal(_logits(model, ids), _logits(base, ids))
    _perturb(model)
    assert torch.equal(_logits(model, ids), _logits(_dense(base, model), ids))
    save_adapter(model, tmp_path)
    other = _tiny.gpt2(seed=1)
    load_adapter(other, tmp_path)
    assert torch.equal(_logits(other, ids), _logits(model, ids))


def test_bert_with_a_classifier_trained_in_full(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 60, (4, 9), generator=g), torch.randint(0, 3, (4,), generator=g)
    base = _tiny.bert(seed=1)
    model = copy.deepcopy(base)
    apply_fishmask(model, keep=0.01, batches=[(ids, labels)], trainable_modules=["classifier"],
                   loss_fn=lambda b: model(b[0], labels=b[1]).loss)
    assert isinstance(model.classifier, ModulesToSave)
    assert not any(n.startswith("classifier") for n in _selection(model))
    k = sum(i.numel() for i in _selection(model).values())
    head = sum(p.numel() for p in base.classifier.parameters())
    assert trainable_parameters(model).trainable == k + head
    assert torch.equal(_logits(model, ids), _logits(base, ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k for k in tensors if not k.endswith(("fishmask_indices", "fishmask_values"))} == {
        "base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_modules"] == ["classifier"]
    other = _tiny.bert(seed=1)
    load_adapter(other, tmp_path)
    assert torch.equal(_logits(other, ids), _logits(model, ids))


def test_select_is_read_only():
    model = _tiny.llama()
    selection = select_fishmask(model, _random_scores(model), FishMaskConfig(keep=0.01))
    assert not has_adapters(model) and sum(i.numel() for p in selection.values() for i in p.values()) == \
        round(0.01 * sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


def test_callback_fits_checkpoints_and_resumes(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft.callbacks import FishMaskCallback
    from tests import _lit

    module = _lit.TinyLM()
    base = copy.deepcopy(module.model)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="fishmask", every_n_train_steps=3, save_top_k=-1)
    trainer = _lit.trainer(tmp_path, callbacks=[FishMaskCallback(keep=0.01, fisher_batches=2), saver],
                           enable_checkpointing=True)
    trainer.fit(module, _lit.loader())
    chosen = _selection(module.model)
    k = sum(i.numel() for i in chosen.values())
    assert k == round(0.01 * sum(p.numel() for p in base.parameters()))
    assert trainable_parameters(module).trainable == k
    state = torch.load(tmp_path / "fishmask.ckpt", weights_only=True)["state_dict"]
    assert all("fishmask_" in key for key in state) and len(state) == 2 * len(chosen)
    ids = _ids()
    assert not torch.equal(_logits(module.model, ids), _logits(base, ids))

    # resume with another fisher_batches (and so another mask of its own): the checkpoint's wins
    own = _lit.TinyLM()
    first = next(iter(_lit.loader()))
    scores = fishmask_scores(own.model, [first], lambda b: own.model(b[0], labels=b[0]).loss)
    mask = select_fishmask(own.model, scores, FishMaskConfig(keep=0.01))
    assert {f"{m}.{p}": i for m, ps in mask.items() for p, i in ps.items()}.keys() != chosen.keys()
    resumed = _lit.TinyLM()
    _lit.trainer(tmp_path, callbacks=[FishMaskCallback(keep=0.01, fisher_batches=1)], max_steps=3).fit(
        resumed, _lit.loader(), ckpt_path=tmp_path / "fishmask.ckpt")
    again = _selection(resumed.model)
    assert again.keys() == chosen.keys() and all(torch.equal(again[n], chosen[n]) for n in chosen)
    assert torch.equal(_logits(resumed.model, ids), _logits(module.model, ids))
    optimizer_params = {id(p) for g in resumed.trainer.optimizers[0].param_groups for p in g["params"]
                        if p.requires_grad}
    assert optimizer_params == {id(p) for _, p in adapter_named_parameters(resumed)}

    # validate: from the checkpoint; without one there is no data to choose the mask from
    fresh = _lit.TinyLM()
    _lit.trainer(tmp_path, callbacks=[FishMaskCallback(keep=0.01)]).validate(
        fresh, _lit.loader(), ckpt_path=tmp_path / "fishmask.ckpt")
    assert torch.equal(_logits(fresh.model, ids), _logits(module.model, ids))
    with pytest.raises(ValueError, match="validate on a module without a FishMask adapter"):
        _lit.trainer(tmp_path, callbacks=[FishMaskCallback(keep=0.01)]).validate(_lit.TinyLM(), _lit.loader())


def test_a_checkpoint_with_another_mask_on_a_merged_or_refused_module(tmp_path):
    """Module A (merged when fit ended) validates with module B's checkpoint (another mask): it
    ends merged with B's adapter, B's outputs, and its frozen weights are W0 under the adapter
    (the replaced layers used to be merged again into the shared base weights). A checkpoint of
    another ``keep`` is refused before anything changes (the mask used to be replaced first)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft import unmerge_adapters
    from lightning_peft.callbacks import FishMaskCallback
    from tests import _lit

    def fit(module, keep, root, loader, **kwargs):
        saver = ModelCheckpoint(dirpath=root, save_last=True)
        callback = FishMaskCallback(keep=keep, fisher_batches=2, **kwargs)
        _lit.trainer(root, max_steps=3, enable_checkpointing=True, callbacks=[callback, saver]).fit(
            module, loader)
        return root / "last.ckpt"

    b = _lit.TinyLM()
    b_ckpt = fit(b, 0.02, tmp_path / "b", _lit.loader(seed=7))
    a = _lit.TinyLM()
    w0 = {n: p.detach().clone() for n, p in _lit.TinyLM().named_parameters()}
    fit(a, 0.02, tmp_path / "a", _lit.loader(), merge_on_fit_end=True)
    ids = _ids()
    _lit.trainer(tmp_path, callbacks=[FishMaskCallback(keep=0.02, fisher_batches=2, merge_on_fit_end=True)]
                 ).validate(a, _lit.loader(), ckpt_path=b_ckpt)
    assert fishmask_layers(a.model) and all(layer.merged for _, layer in fishmask_layers(a.model))
    torch.testing.assert_close(_logits(a.model, ids), _logits(b.model, ids), rtol=1e-6, atol=1e-6)
    unmerge_adapters(a)
    frozen = {n.replace(".base_layer", ""): p for n, p in a.named_parameters() if not p.requires_grad}
    assert all(torch.equal(p, w0[n]) for n, p in frozen.items())

    c = _lit.TinyLM()
    fit(c, 0.02, tmp_path / "c", _lit.loader())
    state = {k: v.clone() for k, v in c.state_dict().items()}
    logits = _logits(c.model, ids)
    other = fit(_lit.TinyLM(), 0.05, tmp_path / "d", _lit.loader())
    with pytest.raises(ValueError, match=r"keep: 0\.05 in the checkpoint, 0\.02 in this run"):
        _lit.trainer(tmp_path, callbacks=[FishMaskCallback(keep=0.02, fisher_batches=2)]).validate(
            c, _lit.loader(), ckpt_path=other)
    assert c.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in c.state_dict().items())
    assert torch.equal(_logits(c.model, ids), logits)


def test_runs_on_t5_whose_feed_forward_reads_the_wrapped_weight():
    """T5's feed-forward reads ``wo.weight`` through the wrapper (it raised AttributeError)."""
    def apply(model):
        fisher = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
        return apply_fishmask(model, fisher=fisher, keep=0.01, target_modules=["wo"])

    _tiny.assert_runs_on_t5(apply)
