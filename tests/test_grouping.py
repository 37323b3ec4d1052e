"""Shared-input fusion of sibling LoRA layers (q/k/v, gate/up): learned, exact, and undone when
siblings stop sharing their input."""

import pytest
import torch
from torch import nn

import kernels
from lightning_peft import apply_lora
from lightning_peft.lora import lora_layers
from tests import _tiny


@pytest.fixture
def count_grouped(monkeypatch):
    calls = []
    original = kernels.lora_linear_grouped

    def spy(*args, **kwargs):
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "lora_linear_grouped", spy)
    return calls


def _fused_and_unfused_llama():
    """A LoRA Llama on all linear layers and the same model with its shared-input groups removed."""
    model = apply_lora(_tiny.llama(), r=4, target_modules="all-linear")
    _tiny.randomize_lora(model)
    reference = apply_lora(_tiny.llama(), r=4, target_modules="all-linear")
    reference.load_state_dict(model.state_dict())
    for _, layer in lora_layers(reference):
        layer.__dict__.pop("_shared_input_group", None)
    return model, reference


def test_llama_qkv_and_gate_up_fused_from_second_pass(count_grouped):
    model, reference = _fused_and_unfused_llama()
    ids = torch.randint(0, 96, (2, 7))
    model(ids)  # first pass: learns which siblings share x
    assert count_grouped == []
    model.train()
    reference.train()
    out = model(ids, labels=ids)
    # per decoder layer: q/k/v (3 members) and gate/up (2 members)
    assert sorted(count_grouped) == [2, 2, 3, 3]
    ref = reference(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    ours = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-6)


class _CrossAttention(nn.Module):
    """q reads x; k and v read x in the first call and `memory` afterwards."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.cross = False

    def forward(self, x, memory):
        kv = memory if self.cross else x
        return self.q(x) + self.k(kv) + self.v(kv)


def test_siblings_that_stop_sharing_their_input_fall_back(count_grouped):
    torch.manual_seed(0)
    model = apply_lora(_CrossAttention(), r=2, target_modules=["q", "k", "v"])
    _tiny.randomize_lora(model)
    x, memory = torch.randn(3, 8), torch.randn(3, 8)
    model(x, memory)
    model(x, memory)
    assert count_grouped == [3]
    model.cross = True
    out = model(x, memory)  # q runs grouped once more, k and v see another tensor
    expected = sum(layer.forward_single(t) for layer, t in
                   ((model.q, x), (model.k, memory), (model.v, memory)))
    torch.testing.assert_close(out, expected)
    count_grouped.clear()
    for _ in range(3):
        torch.testing.assert_close(model(x, memory), expected)
    assert count_grouped == [2, 2, 2]  # relearned: now only k and v share their input


def test_grouped_op_reference_matches_single_ops_with_autocast():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    ws = [torch.randn(n, 16) for n in (8, 4)]
    a_s = [torch.randn(r, 16, requires_grad=True) for r in (2, 3)]
    b_s = [torch.randn(n, r, requires_grad=True) for n, r in ((8, 2), (4, 3))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = kernels.lora_linear_grouped(x, ws, a_s, b_s, [0.5, 2.0])
        singles = [kernels.lora_linear(x, w, a, b, s) for w, a, b, s in zip(ws, a_s, b_s, [0.5, 2.0])]
    for o, s in zip(outs, singles):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), s.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="one entry per member"):
        kernels.lora_linear_grouped(x, ws, a_s[:1], b_s, [0.5, 2.0])


def test_grouping_under_inference_mode(count_grouped):
    model = apply_lora(_tiny.llama(), r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    _tiny.randomize_lora(model)
    ids = torch.randint(0, 96, (2, 7))
    expected = model(ids).logits
    with torch.inference_mode():
        model(ids)
        out = model(ids).logits
    assert count_grouped
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_non_reentrant_gradient_checkpointing(count_grouped):
    """The recomputation in backward must take the forward's path (grouped or not) at every step."""
    model, reference = _fused_and_unfused_llama()
    for m in (model, reference):
        m.train()
        m.gradient_checkpointing_enable({"use_reentrant": False})
    ids = torch.randint(0, 96, (2, 7))
    for _ in range(3):
        for m in (model, reference):
            m.zero_grad()
            m(ids, labels=ids).loss.backward()
        ours = dict(model.named_parameters())
        for name, p in reference.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-6)
    assert count_grouped  # fused from the second step on
