"""Proxy-tuning (arXiv 2401.08565): the processor adds α·(L_tuned − L_untuned) to the scores, exactly
as full forwards compute it; proxy generation equals a manual greedy loop, padded or not, with or
without the KV cache; α = 0 is the large model's own generation; vocabularies must agree."""

import pytest
import torch

from lightning_peft import ProxyTuningLogitsProcessor, apply_lora, proxy_generate
from tests import _tiny

EOS, PAD = 2, 0


def _models(dtype=torch.float64):
    large = _tiny.llama(seed=0, hidden=48).to(dtype)
    tuned = _tiny.llama(seed=1).to(dtype)  # the small model "after tuning": a LoRA with random B
    apply_lora(tuned, r=4, alpha=8, target_modules="all-linear")
    _tiny.randomize_lora(tuned, seed=3)
    tuned.eval()
    untuned = _tiny.llama(seed=1).to(dtype)
    return large, tuned, untuned


def _prompts(padded: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # left padding: the first row has 4 real tokens
        ids[0, :3], mask[0, :3] = PAD, 0
    return ids, mask


def _last_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]


def _manual_greedy(large, tuned, untuned, ids, mask, steps, alpha=1.0):
    """Greedy decoding with full forwards of all three models every step, as generate pads."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    scores = []
    for _ in range(steps):
        s = _last_logits(large, ids, mask) + alpha * (_last_logits(tuned, ids, mask)
                                                     - _last_logits(untuned, ids, mask))
        scores.append(s)
        token = torch.where(done, torch.full_like(done, PAD, dtype=torch.long), s.argmax(-1))
        done |= token == EOS
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if done.all():
            break
    return ids, scores


def test_processor_adds_the_offset_computed_by_hand():
    large, tuned, untuned = _models()
    ids, mask = _prompts(padded=True)
    processor = ProxyTuningLogitsProcessor(tuned, untuned, alpha=0.7, attention_mask=mask)
    fed = []
    tuned.register_forward_pre_hook(  # the processor's calls (not the reference's full forwards)
        lambda m, a, kw: fed.append(kw["input_ids"].shape[1]) if "use_cache" in kw else None,
        with_kwargs=True)
    for _ in range(3):  # the first call fills the caches, later ones feed one token each
        full_mask = torch.cat([mask, torch.ones(2, ids.shape[1] - mask.shape[1], dtype=torch.long)], 1)
        scores = _last_logits(large, ids, full_mask)
        offset = _last_logits(tuned, ids, full_mask) - _last_logits(untuned, ids, full_mask)
        expected = scores + 0.7 * offset
        got = processor(ids, scores.clone())
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        ids = torch.cat([ids, got.argmax(-1, keepdim=True)], dim=1)
    assert fed == [7, 1, 1]  # the KV cache carries the prefix
    # other ids (a new generation): the processor starts over
    other = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    processor.attention_mask = None
    ones = torch.ones_like(other)
    scores = _last_logits(large, other, ones)
    expected = scores + 0.7 * (_last_logits(tuned, other, ones) - _last_logits(untuned, other, ones))
    torch.testing.assert_close(processor(other, scores.clone()), expected, rtol=1e-12, atol=1e-12)
    assert fed[-1] == 5


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_proxy_generation_equals_a_manual_loop(padded, use_cache):
    large, tuned, untuned = _models()
    ids, mask = _prompts(padded)
    out = proxy_generate(large, tuned, untuned, ids, attention_mask=mask, max_new_tokens=6,
                         use_cache=use_cache, pad_token_id=PAD, eos_token_id=EOS,
                         output_scores=True, return_dict_in_generate=True)
    expected_ids, expected_scores = _manual_greedy(large, tuned, untuned, ids, mask, 6)
    assert torch.equal(out.sequences, expected_ids)
    assert len(out.scores) == len(expected_scores)
    for got, want in zip(out.scores, expected_scores):  # generate keeps the scores in float32
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-5)
    own = large.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         pad_token_id=PAD, eos_token_id=EOS)
    assert not torch.equal(own, out.sequences)  # the offset changes the decoding


def test_padded_prompts_with_several_sequences_per_prompt():
    """``generate`` repeats each prompt's row for ``num_return_sequences`` (and ``num_beams``); the
    prompts' mask is repeated the same way (it used to be refused as not fitting the ids). With
    top-k 1 sampling every returned sequence is its prompt's greedy proxy decoding."""
    large, tuned, untuned = _models()
    ids, mask = _prompts(padded=True)
    out = proxy_generate(large, tuned, untuned, ids, attention_mask=mask, max_new_tokens=5, do_sample=True,
                         top_k=1, num_return_sequences=2, pad_token_id=PAD, eos_token_id=EOS)
    expected, _ = _manual_greedy(large, tuned, untuned, ids, mask, 5)
    assert torch.equal(out, expected.repeat_interleave(2, dim=0))
    beams = proxy_generate(large, tuned, untuned, ids, attention_mask=mask, max_new_tokens=3, num_beams=2,
                           pad_token_id=PAD, eos_token_id=EOS)
    assert beams.shape[0] == 2 and torch.equal(beams[:, :7], ids)


def test_alpha_zero_is_the_large_models_own_generation():
    large, tuned, untuned = _models(torch.float32)
    ids, mask = _prompts(padded=True)
    own = large.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=PAD, eos_token_id=EOS)
    proxy = proxy_generate(large, tuned, untuned, ids, attention_mask=mask, max_new_tokens=8, alpha=0.0,
                           pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(own, proxy)
    # alpha scales the offset: the processor's scores at alpha = 0.5 are the formula's
    half, _ = _manual_greedy(*_models(), ids, mask, 5, alpha=0.5)
    got = proxy_generate(*_models(), ids, attention_mask=mask, max_new_tokens=5, alpha=0.5,
                         pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(got, half)


def test_models_in_train_mode_are_restored():
    large, tuned, untuned = _models(torch.float32)
    large.train()
    ids, mask = _prompts(padded=False)
    proxy_generate(large, tuned, untuned, ids, attention_mask=mask, max_new_tokens=2, pad_token_id=PAD)
    assert large.training and not tuned.training and not untuned.training


def test_vocabularies_must_agree():
    large, tuned, untuned = _models(torch.float32)
    ids, mask = _prompts(padded=False)
    with pytest.raises(ValueError, match="vocabulary sizes differ: large 96, tuned 96, untuned 50"):
        proxy_generate(large, tuned, _tiny.gpt2(), ids)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        ProxyTuningLogitsProcessor(_tiny.gpt2(), untuned)
    other_eos = _tiny.llama(seed=1)
    other_eos.config.eos_token_id = 5
    with pytest.raises(ValueError, match="eos_token_id is 2 in large, 2 in tuned, 5 in untuned"):
        proxy_generate(large, tuned, other_eos, ids)
    processor = ProxyTuningLogitsProcessor(tuned, untuned)
    with pytest.raises(ValueError, match="scores have 50 tokens"):
        processor(ids, torch.zeros(2, 50))
    for bad in (float("nan"), "1"):
        with pytest.raises(ValueError, match="alpha"):
            ProxyTuningLogitsProcessor(tuned, untuned, alpha=bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        proxy_generate(large, tuned, untuned, ids, max_new_tokens=0)


def test_truncated_small_model_and_the_example_end_to_end(tmp_path):
    """examples/proxy_tuning.py on a tiny Llama (the small model is the same model, tuned for 2
    steps): alpha = 0 gives the large model's answers, alpha = 1 the tuned model's. The truncated
    small model keeps the first layers and the last one, and its KV cache works."""
    import contextlib
    import io
    import json

    from tests.test_example import _load, save_tiny_model

    example = _load("proxy_tuning")
    large = _tiny.llama(layers=3)
    small = example.truncated(large, 2)
    assert len(small.model.layers) == 2 and small.config.num_hidden_layers == 2
    assert small.model.layers[1].self_attn.layer_idx == 1 and len(large.model.layers) == 3
    assert torch.equal(small.model.layers[1].mlp.up_proj.weight, large.model.layers[2].mlp.up_proj.weight)
    ids = torch.tensor([[5, 9, 11, 3]])
    greedy = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": PAD}
    cached = small.generate(input_ids=ids, use_cache=True, **greedy)
    full = small.generate(input_ids=ids, use_cache=False, **greedy)
    assert torch.equal(cached, full)
    with pytest.raises(ValueError, match="more than the model's 3 layers"):
        example.truncated(large, 4)

    model_dir = save_tiny_model(tmp_path / "tiny")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results = example.main(["--model", str(model_dir), "--steps", "2", "--batch-size", "2", "--r", "2",
                                "--lr", "0.05", "--eval-limit", "3", "--max-new-tokens", "4",
                                "--alphas", "0,1", "--threads", "1", "--out", str(tmp_path / "run")])
    assert "proxy-tuned large (alpha=1)" in stdout.getvalue()
    saved = json.loads((tmp_path / "run" / "proxy_tuning.json").read_text())
    assert saved == json.loads(json.dumps(results))
    rows = saved["results"]
    assert rows["proxy-tuned large (alpha=0)"]["samples"] == rows["large alone"]["samples"]
    assert rows["proxy-tuned large (alpha=1)"]["samples"] == rows["tuned small alone"]["samples"]
    assert rows["tuned small alone"]["samples"] != rows["large alone"]["samples"]  # the tuning changed it
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2


@pytest.mark.parametrize(("argv", "option"), [(["--alphas", "0.5,nan"], "--alphas"),
                                              (["--alphas", "inf"], "--alphas")])
def test_example_refuses_non_finite_alphas_before_loading(argv, option, monkeypatch, capsys):
    """A non-finite alpha failed only after the training and the other alphas' generations."""
    from tests.test_example import _fails_fast, _load

    _fails_fast(_load("proxy_tuning"), argv, option, monkeypatch, capsys)


def test_example_small_layers_beyond_the_model_is_a_usage_error(tmp_path, capsys):
    from tests.test_example import _load, save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    with pytest.raises(SystemExit) as info:
        _load("proxy_tuning").main(["--model", str(model), "--small-layers", "99", "--threads", "1",
                                    "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "--small-layers 99 is more than the model's" in capsys.readouterr().err
