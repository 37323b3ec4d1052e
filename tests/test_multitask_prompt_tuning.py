"""Multitask prompt tuning: task_ids per batch row, training on two tasks then adapting to a new
one from the source adapter (as HF PEFT's prompt_tuning_init options), PEFT's file format both
ways, cached generation, bad arguments."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_peft import (
    MultitaskPromptTuningConfig,
    apply_multitask_prompt_tuning,
    load_adapter,
    save_adapter,
    trainable_parameters,
    use_task_ids,
)
from lightning_peft._base import adapter_named_parameters, has_adapters
from tests import _tiny

N, R = 4, 2


def _ids(batch=2, length=6, seed=0):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _perturb(model, scale=0.5, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapter_named_parameters(model):
            param.add_(torch.randn(param.shape, generator=g) * scale)


def _task_batches():
    """Task 0 continues with token 7s, task 1 with token 9s, rows mixed in each batch."""
    ids = _ids(4, 6, seed=1)
    ids[[0, 2], 3:] = 7
    ids[[1, 3], 3:] = 9
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels, "task_ids": torch.tensor([0, 1, 0, 1])}


def _fit(model, batch, steps=15, lr=0.2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_train_on_two_tasks_then_adapt_to_a_new_one(tmp_path):
    model = apply_multitask_prompt_tuning(_tiny.llama(), num_virtual_tokens=N, num_tasks=2, num_ranks=R)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "prompt_encoder" not in n}
    assert trainable_parameters(model).trainable == N * 32 + 2 * N * R + 2 * R * 32
    batch = _task_batches()
    losses = _fit(model, batch)
    assert losses[-1] < losses[0] - 0.05, losses
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name
    with torch.no_grad():  # the two tasks' prompts differ
        layer = model.prompt_encoder
        assert not torch.equal(layer.prompt(1, torch.tensor([0])), layer.prompt(1, torch.tensor([1])))
    save_adapter(model, tmp_path / "source")

    source = layer.adapter_parameters()
    for init, cols, rows in [
            ("average_source_tasks", source["prefix_task_cols"].mean(0), source["prefix_task_rows"].mean(0)),
            ("exact_source_task", source["prefix_task_cols"][1], source["prefix_task_rows"][1]),
            ("only_source_shared", None, None)]:
        target = apply_multitask_prompt_tuning(_tiny.llama(), num_virtual_tokens=N, num_ranks=R, init=init,
                                               source=str(tmp_path / "source"), init_task=1)
        new = target.prompt_encoder
        assert torch.equal(new.embedding, source["embedding"])
        if cols is not None:
            assert torch.allclose(new.prefix_task_cols[0], cols)
            assert torch.allclose(new.prefix_task_rows[0], rows)
        # the new task (continue with 8s) trains from there, without task_ids (a single task)
        ids = _ids(2, 6, seed=3)
        ids[:, 3:] = 8
        losses = _fit(target, {"input_ids": ids, "labels": ids}, steps=10)
        assert losses[-1] < losses[0], (init, losses)


def test_source_init_matches_peft_s(tmp_path):
    from peft import MultitaskPromptTuningConfig as PeftConfig
    from peft import get_peft_model

    model = apply_multitask_prompt_tuning(_tiny.llama(), num_virtual_tokens=N, num_tasks=3, num_ranks=R)
    _perturb(model)
    save_adapter(model, tmp_path / "source")
    ours = apply_multitask_prompt_tuning(_tiny.llama(), num_virtual_tokens=N, num_ranks=R,
                                         init="average_source_tasks", source=str(tmp_path / "source"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(_tiny.llama(), PeftConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, num_ranks=R, num_tasks=1,
            prompt_tuning_init="AVERAGE_SOURCE_TASKS",
            prompt_tuning_init_state_dict_path=str(tmp_path / "source" / "adapter_model.safetensors"))).eval()
    ids, tasks = _ids(), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        ref = peft(input_ids=ids, task_ids=tasks).logits
        assert torch.equal(ref, ours(input_ids=ids, task_ids=tasks).logits)


def test_files_load_both_ways_with_peft(tmp_path):
    from peft import MultitaskPromptTuningConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    ids, mask, tasks = _ids(), torch.ones(2, 6, dtype=torch.long), torch.tensor([2, 0])
    model = apply_multitask_prompt_tuning(_tiny.llama(), num_virtual_tokens=N, num_tasks=3, num_ranks=R)
    _perturb(model)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, task_ids=tasks).logits
    save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(_tiny.llama(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids, attention_mask=mask, task_ids=tasks).logits, ours)

    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(_tiny.llama(), PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                          num_tasks=3, num_ranks=R)).eval()
        with torch.no_grad():
            for param in theirs.prompt_encoder["default"].parameters():
                param.normal_()
            ref = theirs(input_ids=ids, attention_mask=mask, task_ids=tasks).logits
        theirs.save_pretrained(str(tmp_path / "theirs"))
    mine = load_adapter(_tiny.llama(), tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(mine(input_ids=ids, attention_mask=mask, task_ids=tasks).logits, ref)


def test_generation_with_task_ids_cache_equals_without():
    model = apply_multitask_prompt_tuning(_tiny.llama(), num_virtual_tokens=N, num_tasks=2, num_ranks=R)
    _perturb(model)
    ids, mask = _ids(2, 5), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad(), use_task_ids(model, [1, 0]):
        a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        b = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           use_cache=False)
    assert torch.equal(a, b)
    with torch.no_grad():
        cur = ids
        for _ in range(6):
            logits = model(input_ids=cur, task_ids=torch.tensor([1, 0])).logits
            cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(a, cur)


def test_bad_task_ids_and_arguments(tmp_path):
    model = apply_multitask_prompt_tuning(_tiny.llama(), num_virtual_tokens=N, num_tasks=2)
    ids = _ids()
    with pytest.raises(ValueError, match="task_ids is needed"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        model(input_ids=ids, task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        MultitaskPromptTuningConfig(num_tasks=0)
    with pytest.raises(ValueError, match="needs source"):
        MultitaskPromptTuningConfig(init="average_source_tasks")
    with pytest.raises(ValueError, match="init must be one of"):
        MultitaskPromptTuningConfig(init="sample_vocab")
    save_adapter(model, tmp_path / "source")
    victim = _tiny.llama()
    for kwargs, match in [(dict(num_virtual_tokens=N + 1), "num_virtual_tokens is 4 in the source, 5 here"),
                          (dict(num_virtual_tokens=N, num_ranks=3), "num_ranks is 1 in the source, 3 here"),
                          (dict(num_virtual_tokens=N, init="exact_source_task", init_task=5), "init_task=5")]:
        kwargs.setdefault("init", "average_source_tasks")
        with pytest.raises(ValueError, match=match):
            apply_multitask_prompt_tuning(victim, source=str(tmp_path / "source"), **kwargs)
        assert not has_adapters(victim) and not victim._forward_pre_hooks
    with pytest.raises(ValueError, match="neither an adapter directory nor a safetensors file"):
        apply_multitask_prompt_tuning(victim, init="only_source_shared", source=str(tmp_path / "missing"))
