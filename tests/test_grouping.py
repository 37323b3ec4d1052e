"""Shared-input fusion of sibling LoRA layers (q/k/v, gate/up): learned, exact, and undone when
siblings stop sharing their input."""

import pytest
import torch
import transformers
from torch import nn

import kernels
from kernels.lora import dropout_keep_mask
from lightning_peft import apply_lora
from lightning_peft.methods.lora import lora_layers
from tests import _tiny


def _fused_and_unfused_llama():
    """A LoRA Llama on all linear layers and the same model with its shared-input groups removed."""
    model = apply_lora(_tiny.llama(), r=4, target_modules="all-linear")
    _tiny.randomize_lora(model)
    reference = apply_lora(_tiny.llama(), r=4, target_modules="all-linear")
    reference.load_state_dict(model.state_dict())
    for _, layer in lora_layers(reference):
        layer.__dict__.pop("_shared_input_group", None)
    return model, reference


def _unfused_copy(model, build, **lora):
    """``build()`` with the LoRA of ``model`` (same weights) and no shared-input groups."""
    reference = apply_lora(build(), **lora)
    reference.load_state_dict(model.state_dict())
    for _, layer in lora_layers(reference):
        layer.__dict__.pop("_shared_input_group", None)
    return reference


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


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_no_fusion_in_eval_without_autograd(count_grouped, mode):
    """In eval mode without autograd (generation, evaluation) each layer runs alone, with the same
    output; the learned fusion is untouched and the next recorded pass fuses again. In training
    mode under ``no_grad`` (reentrant checkpointing's forward) the layers stay fused."""
    model = apply_lora(_tiny.llama(), r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    _tiny.randomize_lora(model)
    ids = torch.randint(0, 96, (2, 7))
    model.eval()
    model(ids)  # learns
    expected = model(ids).logits
    assert count_grouped == [3, 3]
    with mode():
        out = model(ids).logits
        model(ids)
    assert count_grouped == [3, 3]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    model(ids)
    assert count_grouped == [3, 3, 3, 3]
    model.train()
    with mode():
        model(ids)
    assert count_grouped == [3] * 6


def test_reentrant_gradient_checkpointing_with_dropout_is_the_plain_step(count_grouped):
    """Reentrant checkpointing runs each block's forward under ``no_grad`` in training mode and
    replays it in backward: both take the fused path, so with dropout (same seed) the loss and
    every gradient equal the step without checkpointing."""
    model = apply_lora(_tiny.llama(), r=4, target_modules="all-linear", dropout=0.2)
    _tiny.randomize_lora(model)
    plain = apply_lora(_tiny.llama(), r=4, target_modules="all-linear", dropout=0.2)
    plain.load_state_dict(model.state_dict())
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.enable_input_require_grads()
    for m in (model, plain):
        m.train()
    ids = torch.randint(0, 96, (2, 7))
    for step in range(3):
        results = []
        for m in (model, plain):
            m.zero_grad()
            torch.manual_seed(step)
            loss = m(ids, labels=ids).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()
                                            if p.requires_grad}))
        (loss, grads), (want, want_grads) = results
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)
    assert count_grouped


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


def _grouped_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 50, generator=g, dtype=dtype).requires_grad_()
    outs, ranks = (23, 9, 40), (8, 4, 16)
    ws = [(torch.randn(n, 50, generator=g, dtype=dtype) / 7).requires_grad_() for n in outs]
    a_s = [(torch.randn(r, 50, generator=g, dtype=dtype) / 7).requires_grad_() for r in ranks]
    b_s = [torch.randn(n, r, generator=g, dtype=dtype).requires_grad_() for n, r in zip(outs, ranks)]
    biases = [torch.randn(23, generator=g, dtype=dtype).requires_grad_(), None,
              torch.randn(40, generator=g, dtype=dtype).requires_grad_()]
    return x, ws, a_s, b_s, [2.0, 0.5, 0.25], biases


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7])
def test_grouped_torch_op_matches_float64_formula_with_one_shared_mask(p):
    """The CPU grouped op against y_i = x·W_iᵀ + s_i·(x⊙m/(1-p))·A_iᵀ·B_iᵀ + b_i with the one
    mask m that the same generator state gives, values and every gradient."""
    x, ws, a_s, b_s, ss, biases = _grouped_inputs()
    gen = torch.Generator().manual_seed(9)
    ys = kernels.lora_linear_grouped(x, ws, a_s, b_s, ss, biases, dropout_p=p, generator=gen)
    keep = dropout_keep_mask((21, 50), p, gen.manual_seed(9)).view(3, 7, 50) if p else 1.0
    xd = x * keep / (1.0 - p)
    want = [x @ w.t() + s * (xd @ a.t()) @ b.t() + (0 if bb is None else bb)
            for w, a, b, s, bb in zip(ws, a_s, b_s, ss, biases)]
    leaves = [x, *ws, *a_s, *b_s, biases[0], biases[2]]
    gos = [torch.randn(y.shape, dtype=torch.float64) for y in want]
    for y, w in zip(ys, want):
        torch.testing.assert_close(y, w)
    for got, exp in zip(torch.autograd.grad(ys, leaves, gos), torch.autograd.grad(want, leaves, gos)):
        torch.testing.assert_close(got, exp)


def test_grouped_torch_op_partial_outputs_and_saved_tensors():
    x, ws, a_s, b_s, ss, biases = _grouped_inputs(torch.float32)
    ws = [w.detach() for w in ws]
    ys = kernels.lora_linear_grouped(x, ws, a_s, b_s, ss, biases)
    # only the middle output is used: the others' adapters get no (or a zero) gradient
    got = torch.autograd.grad(ys[1].sum(), [x, *a_s, *b_s], allow_unused=True)
    singles = kernels.lora_linear(x, ws[1], a_s[1], b_s[1], ss[1])
    want = torch.autograd.grad(singles.sum(), [x, a_s[1], b_s[1]])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[1])
    torch.testing.assert_close(got[5], want[2])
    for unused in (got[1], got[3], got[4], got[6]):
        assert unused is None or not unused.any()
    # saved beyond the inputs: S_cat (21 x 28) and the ~6% dropped positions - never a copy of x
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.lora_linear_grouped(x, ws, a_s, b_s, ss, biases, dropout_p=0.06)
    inputs = {t.untyped_storage().data_ptr() for t in (x, *ws, *a_s, *b_s)}
    new = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert [tuple(t.shape) for t in new if t.dtype == torch.float32] == [(21, 28)]
    (positions,) = [t for t in new if t.dtype == torch.int64]
    assert positions.dim() == 1 and positions.numel() < 0.2 * x.numel()


# Models whose attention registers k_proj, v_proj before q_proj but calls q_proj first.
def _opt():
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0))


def _bart():
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))


def _clip_text():
    torch.manual_seed(0)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def _output(model, ids):
    out = model(ids, labels=ids) if not isinstance(model, transformers.CLIPTextModel) else model(ids)
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return main, (out.loss if getattr(out, "loss", None) is not None else main.square().mean())


@pytest.mark.parametrize(("build", "expected"), [
    (_opt, [3, 3]),            # q/k/v of each decoder layer
    (_bart, [2, 3, 3]),        # encoder and decoder self-attention; k/v of the cross-attention
    (_clip_text, [3, 3]),
])
def test_fusion_engages_when_q_proj_runs_before_the_lower_registered_k_proj(build, expected,
                                                                            count_grouped):
    lora = dict(r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    model = apply_lora(build(), **lora)
    _tiny.randomize_lora(model)
    reference = _unfused_copy(model, build, **lora)
    ids = torch.randint(2, 64, (2, 7))
    model.train()
    reference.train()
    _output(model, ids)  # first pass: learns which siblings share x (and in which order)
    assert count_grouped == []
    for step in range(2):
        count_grouped.clear()
        out, loss = _output(model, ids)
        assert sorted(count_grouped) == expected, f"pass {step + 2}"
        ref, ref_loss = _output(reference, ids)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        model.zero_grad()
        reference.zero_grad()
        loss.backward()
        ref_loss.backward()
        ours = dict(model.named_parameters())
        for name, p in reference.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_fp32_adapters_on_a_bf16_base_are_grouped(count_grouped):
    """A bf16 Llama with fp32 adapters (HF PEFT's autocast_adapter_dtype): still grouped, the same
    outputs and fp32 adapter gradients as the layers run one by one."""
    def build():
        return _tiny.llama().to(torch.bfloat16)

    lora = dict(r=4, target_modules="all-linear")
    model = apply_lora(build(), **lora)
    _tiny.randomize_lora(model)
    reference = _unfused_copy(model, build, **lora)
    for m in (model, reference):
        for _, layer in lora_layers(m):
            for name in ("lora_A", "lora_B"):
                getattr(layer, name).data = getattr(layer, name).data.float()
        m.train()
    ids = torch.randint(0, 96, (2, 7))
    model(ids)
    count_grouped.clear()
    out = model(ids, labels=ids)
    assert sorted(count_grouped) == [2, 2, 3, 3]
    ref = reference(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits, ref.logits, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    ref.loss.backward()
    ours = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            assert ours[name].grad.dtype == torch.float32
            # bf16 activations: the rounding differences of the two paths reach the gradients
            err = (ours[name].grad - p.grad).abs().max()
            assert err <= 5e-2 * p.grad.abs().max(), name
