"""Intrinsic dimension (DID and SAID): the Fastfood projection against a dense float64 matrix,
its gradient, d = D as ordinary training, only θ_d (and λ) training, merging, files, the
one-projection-per-forward cache, and the arguments refused."""

import json
import math

import pytest
import torch
from torch import nn

from kernels.hadamard import hadamard_matrix
from lightning_peft import (
    IntrinsicDimensionCallback,
    IntrinsicDimensionConfig,
    apply_intrinsic,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_parameters,
    unmerge_adapters,
)
from lightning_peft._base import adapter_named_parameters, has_adapters
from lightning_peft.methods.intrinsic_dimension import Fastfood, find_projection, intrinsic_layers
from tests import _lit, _tiny

torch.set_num_threads(1)


def _dense(f: Fastfood) -> torch.Tensor:
    """P (D, d_in) in float64 built from the drawn B, Π, G as explicit matrices, block by block."""
    c = f.constants(torch.device("cpu"))
    L = f.L
    h = hadamard_matrix(L, torch.float64)
    perm = c.perm.long().reshape(f.blocks, L) - torch.arange(f.blocks).unsqueeze(1) * L
    blocks = []
    for b in range(f.blocks):
        pi = torch.zeros(L, L, dtype=torch.float64)
        pi[torch.arange(L), perm[b]] = 1.0  # (Π y)_i = y[perm_i]
        blocks.append(h @ torch.diag(c.gain[b].double()) @ pi @ h @ torch.diag(c.sign[b].double()))
    return torch.cat(blocks)[: f.D, : f.d_in]


SHAPES = [(1, 10), (3, 3), (5, 37), (8, 64), (20, 300), (100, 1000)]


@pytest.mark.parametrize("d_in,D", SHAPES)
def test_fastfood_against_a_dense_float64_matrix_column_by_column(d_in, D):
    f = Fastfood(d_in, D, seed=d_in + D)
    dense = _dense(f)
    columns = torch.stack([f(torch.eye(d_in, dtype=torch.float32)[j]) for j in range(d_in)], 1)
    assert columns.shape == (D, d_in) and columns.dtype == torch.float32
    torch.testing.assert_close(columns.double(), dense, atol=2e-6, rtol=0)
    theta = torch.randn(d_in, dtype=torch.float64)
    torch.testing.assert_close(f(theta.float()).double(), dense @ theta, atol=5e-6, rtol=1e-5)
    y = torch.randn(D, dtype=torch.float64)
    torch.testing.assert_close(f.transpose(y.float()).double(), dense.t() @ y, atol=2e-5, rtol=1e-5)


def test_fastfood_gradient_is_p_transpose_against_float64():
    f = Fastfood(20, 300, seed=4)
    dense = _dense(f)
    theta = torch.randn(20, requires_grad=True)
    w = torch.randn(300, dtype=torch.float64)
    (f(theta) * w.float()).sum().backward()
    torch.testing.assert_close(theta.grad.double(), dense.t() @ w, atol=2e-5, rtol=1e-5)
    # gradcheck on the float64 view of the op: the Function's backward is Pᵀ (fp32 math)
    theta64 = torch.randn(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: f(t).double(), (theta64,), eps=1e-3, atol=1e-3)


def test_fastfood_columns_have_unit_norm_and_the_seed_rebuilds_p():
    f = Fastfood(8, 64, seed=1)  # 8 whole blocks of L = 8: every column exactly unit-norm
    torch.testing.assert_close(_dense(f).norm(dim=0), torch.ones(8, dtype=torch.float64))
    again, other = Fastfood(8, 64, seed=1), Fastfood(8, 64, seed=2)
    theta = torch.randn(8)
    assert torch.equal(f(theta), again(theta)) and not torch.equal(f(theta), other(theta))


class Net(nn.Module):
    """Two bias-free 8x8 layers: D = 128, a power of two."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(8, 8, bias=False)
        self.fc2 = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _flat(net):
    return torch.cat([net.fc1.weight.reshape(-1), net.fc2.weight.reshape(-1)])


def test_d_equal_to_D_reaches_the_fully_trained_weights():
    """P square (d = D = 128, no padding) is invertible: θ_d = P⁻¹(θ* − θ0) reproduces a model
    trained in full."""
    x, target = torch.randn(16, 8), torch.randn(16, 8)
    full = Net()
    opt = torch.optim.Adam(full.parameters(), lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(full(x), target).backward()
        opt.step()
    model = apply_intrinsic(Net(), d=128, said=False)
    proj = find_projection(model)[1]
    dense = _dense(proj.fastfood)
    assert dense.shape == (128, 128) and torch.linalg.matrix_rank(dense) == 128
    theta = torch.linalg.solve(dense, _flat(full).double() - _flat(Net()).double())
    with torch.no_grad():
        proj.theta_d.copy_(theta.float())
        torch.testing.assert_close(model(x), full(x), atol=1e-5, rtol=1e-5)


def test_d_equal_to_D_with_orthogonal_p_steps_like_ordinary_training():
    """With |G| constant P is orthogonal; then an SGD step on θ_d moves the weights exactly as
    an SGD step on the weights themselves (P·Pᵀ = I)."""
    x, target = torch.randn(16, 8), torch.randn(16, 8)
    model = apply_intrinsic(Net(), d=128, said=False)
    proj = find_projection(model)[1]
    consts = proj.fastfood.constants(torch.device("cpu"))
    consts.gain.fill_(1.0 / proj.fastfood.L)  # H·Π·H·B / L: orthogonal
    dense = _dense(proj.fastfood)
    torch.testing.assert_close(dense @ dense.t(), torch.eye(128, dtype=torch.float64), atol=1e-12, rtol=0)
    full = Net()
    for _ in range(3):
        for net in (model, full):
            params = [p for p in net.parameters() if p.requires_grad]
            loss = nn.functional.mse_loss(net(x), target)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(0.5 * g)
        with torch.no_grad():
            moved = _flat(Net()) + torch.cat([t.reshape(-1) for t in proj.all_deltas()])
        torch.testing.assert_close(moved, _flat(full), atol=1e-5, rtol=1e-5)


def _batch():
    return torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("said", [True, False])
def test_fresh_subspace_gives_the_base_outputs_and_only_theta_trains(said):
    model = _tiny.bert()
    ids = _batch()
    with torch.no_grad():
        base = model(ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_intrinsic(model, d=300, said=said)
    proj = find_projection(model)[1]
    assert trainable_parameters(model).trainable == 300
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == (
        ["intrinsic_dimension.said_lambda", "intrinsic_dimension.theta_d"] if said else
        ["intrinsic_dimension.theta_d"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    labels = torch.tensor([0, 2])
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=labels).loss.backward()
        opt.step()
    assert proj.theta_d.abs().sum() > 0
    if said:
        assert not torch.equal(proj.said_lambda, torch.ones_like(proj.said_lambda))
    for name, param in model.named_parameters():
        if not param.requires_grad:
            original = name.replace(".base_layer", "")
            assert torch.equal(param, before[original]), name
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, base)


def test_embeddings_are_left_out_unless_asked_and_heads_can_train_in_full():
    model = apply_intrinsic(_tiny.bert(), d=100)
    names = find_projection(model)[1].names
    assert not any("embeddings.word_embeddings" in n for n in names) and "classifier.weight" in names
    with_emb = apply_intrinsic(_tiny.bert(), d=100, include_embeddings=True)
    assert "bert.embeddings.word_embeddings.weight" in find_projection(with_emb)[1].names
    headed = apply_intrinsic(_tiny.bert(), d=100, trainable_modules=["classifier"])
    assert "classifier.weight" not in find_projection(headed)[1].names
    assert trainable_parameters(headed).trainable == 100 + 24 * 3 + 3
    only = apply_intrinsic(_tiny.bert(), d=10, said=False, target_modules=["query", "value"])
    assert all(n.endswith(("query.weight", "query.bias", "value.weight", "value.bias"))
               for n in find_projection(only)[1].names)


def test_one_projection_per_forward_and_a_fresh_one_after_each_step(monkeypatch):
    model = apply_intrinsic(_tiny.bert(), d=200)
    proj = find_projection(model)[1]
    calls = []
    original = Fastfood.forward_raw
    monkeypatch.setattr(Fastfood, "forward_raw", lambda self, t: calls.append(1) or original(self, t))
    ids, labels = _batch(), torch.tensor([0, 1])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    outs = []
    for _ in range(2):  # gradient accumulation: two passes with the same θ_d, each its own graph
        model(ids, labels=labels).loss.backward()
    assert len(calls) == 2
    opt.step()
    with torch.no_grad():
        outs.append(model(ids).logits)
    assert len(calls) == 3
    with torch.no_grad():
        proj.theta_d.mul_(2.0)  # a change of θ_d outside the optimizer is seen too
        outs.append(model(ids).logits)
    assert len(calls) == 4 and not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("said", [True, False])
def test_merge_and_unmerge(said):
    model = apply_intrinsic(_tiny.bert(), d=150, said=said)
    proj = find_projection(model)[1]
    with torch.no_grad():
        proj.theta_d.normal_(0, 0.5)
        if said:
            proj.said_lambda.uniform_(0.5, 1.5)
    ids = _batch()
    originals = {n: m.base_layer.weight.clone() for n, m in intrinsic_layers(model)
                 if hasattr(m.base_layer, "weight")}
    with torch.no_grad():
        live = model(ids).logits
        merge_adapters(model)
        assert all(m.merged for _, m in intrinsic_layers(model))
        assert torch.equal(model(ids).logits, live)
        unmerge_adapters(model)
    for n, m in intrinsic_layers(model):
        if n in originals:
            assert torch.equal(m.base_layer.weight, originals[n])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, live)


@pytest.mark.parametrize("said", [True, False])
def test_save_load_round_trip_and_the_file(tmp_path, said):
    model = apply_intrinsic(_tiny.bert(), d=120, said=said, seed=7)
    proj = find_projection(model)[1]
    with torch.no_grad():
        proj.theta_d.normal_(0, 0.3)
        if said:
            proj.said_lambda.uniform_(0.5, 1.5)
    ids = _batch()
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "INTRINSIC_DIMENSION"
    assert (config["d"], config["said"], config["seed"]) == (120, said, 7)
    assert [n for n, _ in config["parameters"]] == list(proj.names)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    m = len(proj.shapes)
    assert {k: v.numel() for k, v in tensors.items()} == {
        "base_model.model.intrinsic_dimension.theta_d": 120 - m if said else 120,
        **({"base_model.model.intrinsic_dimension.said_lambda": m} if said else {})}
    fresh = load_adapter(_tiny.bert(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
    merge_adapters(model)  # a merged model saves the same file
    save_adapter(model, tmp_path / "b")
    again = load_adapter(_tiny.bert(), tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(seed=-1), "seed must be an integer"),
    (lambda c: c.update(d=0), "d must be an integer >= 1"),
    (lambda c: c.update(d=10 ** 9), r"d=1000000000 exceeds D="),
    (lambda c: c["parameters"][0].__setitem__(1, 7), "records 7 weights"),
    (lambda c: c["parameters"][0].__setitem__(0, "bert.nothing.weight"), "has no module"),
    (lambda c: c.update(projection="dense"), "projection is 'dense'"),
    (lambda c: c.update(said="yes"), "said must be true or false"),
])
def test_a_bad_file_leaves_the_model_unchanged(tmp_path, edit, match):
    model = apply_intrinsic(_tiny.bert(), d=120)
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = str(tmp_path / "a" / "adapter_model.safetensors")  # no metadata: the config alone speaks
    save_file(load_file(weights), weights)
    victim = _tiny.bert()
    state = {n: t.clone() for n, t in victim.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_adapter(victim, tmp_path / "a")
    assert victim.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in victim.state_dict().items())
    assert not has_adapters(victim)


def test_bad_arguments_name_themselves():
    for d in (0, -3):
        with pytest.raises(ValueError, match=rf"d must be an integer >= 1 .*got {d}"):
            IntrinsicDimensionConfig(d=d)
    with pytest.raises(ValueError, match="d must be an integer >= 1"):
        IntrinsicDimensionConfig(d=2.5)
    D = sum(p.numel() for n, p in _tiny.bert().named_parameters() if "_embeddings." not in n)
    with pytest.raises(ValueError, match=rf"d={D + 1} exceeds D={D}"):
        apply_intrinsic(_tiny.bert(), d=D + 1, said=False)
    apply_intrinsic(_tiny.bert(), d=D, said=False)  # d = D is allowed
    with pytest.raises(ValueError, match=r"d=5 with said=True must exceed m="):
        apply_intrinsic(_tiny.bert(), d=5)
    with pytest.raises(ValueError, match="said must be True or False"):
        IntrinsicDimensionConfig(said=1)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        IntrinsicDimensionConfig(seed=-1)
    with pytest.raises(ValueError, match=r"target_modules entry 'nothing' matches no leaf module.*'query'"):
        apply_intrinsic(_tiny.bert(), target_modules=["nothing"], d=10)
    model = apply_intrinsic(_tiny.bert(), d=100)
    assert apply_intrinsic(model, d=100) is model  # the same subspace again: harmless
    with pytest.raises(ValueError, match="already carries an intrinsic-dimension subspace with d=100"):
        apply_intrinsic(model, d=200)
    with pytest.raises(ValueError, match="not both"):
        apply_intrinsic(_tiny.bert(), d=5, config=IntrinsicDimensionConfig(d=100))


def test_callback_trains_only_the_subspace(tmp_path):
    module = _lit.TinyLM()
    before = {n: t.detach().clone() for n, t in module.model.named_parameters()}
    callback = IntrinsicDimensionCallback(d=64, adapter_dir=str(tmp_path / "adapter"))
    trainer = _lit.trainer(tmp_path, max_steps=3, callbacks=[callback])
    trainer.fit(module, _lit.loader())
    owned = dict(adapter_named_parameters(module.model))
    assert sorted(owned) == ["intrinsic_dimension.said_lambda", "intrinsic_dimension.theta_d"]
    assert owned["intrinsic_dimension.theta_d"].abs().sum() > 0
    for n, p in module.model.named_parameters():
        if n not in owned:
            assert torch.equal(p, before[n.replace(".base_layer", "")]), n
    ids = torch.randint(0, 96, (2, 9))
    other = load_adapter(_tiny.llama(seed=0), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, module.model(ids).logits)
    assert math.isclose(trainable_parameters(other).trainable, 64)


def test_runs_on_t5_whose_feed_forward_reads_the_wrapped_weight():
    """T5's feed-forward reads ``wo.weight`` through the wrapper (it raised AttributeError)."""
    _tiny.assert_runs_on_t5(lambda model: apply_intrinsic(model, d=8, said=False, target_modules=["wo"]))
