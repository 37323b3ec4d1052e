"""Review of the methods added for issues 12-14, as a new user would use them."""

import tempfile

import pytest
import torch

from lightning_peft import apply_lora, load_adapter, save_adapter
from tests import _tiny


def _ids():
    return torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("loaded", [False, True])
def test_adapter_names_keyword_works_with_only_the_default_adapter(loaded):
    # model(ids, adapter_names=[...]) must not be silently ignored before any add_adapter:
    # transformers' forward swallows unknown keywords, so every row ran the default adapter
    ids = _ids()
    base = _tiny.llama()(ids).logits
    model = apply_lora(_tiny.llama(), r=2)
    _tiny.randomize_lora(model)
    if loaded:
        with tempfile.TemporaryDirectory() as d:
            save_adapter(model, d)
            model = _tiny.llama()
            load_adapter(model, d)
    adapted = model(ids).logits
    out = model(ids, adapter_names=["__base__", "default"]).logits
    torch.testing.assert_close(out[0], base[0])
    torch.testing.assert_close(out[1], adapted[1])
    with pytest.raises(ValueError, match="unknown"):
        model(ids, adapter_names=["default", "nope"])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("first, second, match", [
    (dict(bottleneck=4), dict(bottleneck=8), "bottleneck=4"),
    (dict(bottleneck=4), dict(bottleneck=4, activation="gelu"), "activation='relu'"),
    (dict(bottleneck=4, placement="parallel"), dict(bottleneck=4, placement="parallel", scaling=4.0),
     "scaling"),
    # new sites with another width: the model would carry two settings that no file can hold
    (dict(bottleneck=4, config="pfeiffer"), dict(bottleneck=8), "bottleneck=4"),
])
def test_apply_adapters_again_with_another_setting_is_refused(first, second, match):
    from lightning_peft import apply_adapters

    model = apply_adapters(_tiny.llama(), **first)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        apply_adapters(model, **second)
    assert _same(before, _state(model))
    apply_adapters(model, **first)  # the same setting again stays harmless
    assert _same(before, _state(model))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "multitask_prompt_tuning"])
def test_prompt_applied_again_with_another_length_is_refused(method):
    import lightning_peft

    apply = getattr(lightning_peft, f"apply_{method}")
    model = apply(_tiny.llama(), num_virtual_tokens=2)
    before = _state(model)
    with pytest.raises(ValueError, match="num_virtual_tokens=2"):
        apply(model, num_virtual_tokens=3)
    assert _same(before, _state(model))
    apply(model, num_virtual_tokens=2)
    assert _same(before, _state(model))


def _saved_adapters(tmp_path, count=3):
    from lightning_peft import apply_adapters

    dirs = []
    for i in range(count):
        model = apply_adapters(_tiny.llama(), bottleneck=4)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1 * (i + 1))
        dirs.append(str(tmp_path / f"task_{i}"))
        save_adapter(model, dirs[-1])
    return dirs


@pytest.mark.parametrize("second", [dict(dirs=[0, 2]), dict(dirs=[0, 1], temperature=2.0)])
def test_adapter_fusion_applied_again_with_other_adapters_is_refused(tmp_path, second):
    from lightning_peft import apply_adapter_fusion

    dirs = _saved_adapters(tmp_path)
    model = apply_adapter_fusion(_tiny.llama(), dirs[:2])
    before = _state(model)
    with pytest.raises(ValueError, match="already carries an AdapterFusion"):
        apply_adapter_fusion(model, [dirs[i] for i in second["dirs"]],
                             temperature=second.get("temperature", 1.0))
    assert _same(before, _state(model))
    assert apply_adapter_fusion(model, dirs[:2]) is model  # the same fusion again stays harmless
    assert _same(before, _state(model))


def test_child_tuning_attached_twice_to_one_optimizer_is_refused():
    # two handles on one optimizer multiplied the masks: mode F trained p^2 of the weights with
    # gradients scaled by 1/p^2
    from lightning_peft import apply_child_tuning, attach_child_tuning

    model = apply_child_tuning(_tiny.llama(), mode="F", p=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = attach_child_tuning(model, optimizer)
    hooks = len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)
    with pytest.raises(ValueError, match="already has Child-tuning attached"):
        attach_child_tuning(model, optimizer)
    assert (len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)) == hooks
    handle.remove()
    again = attach_child_tuning(model, optimizer)  # after remove() it attaches again
    ids = _ids()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    moved = sum((p.detach() != before[n]).sum().item() for n, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    assert 0.4 < moved / total <= 0.5  # one Bernoulli(0.5) mask (a few gradients are exactly 0)
    again.remove()
    attach_child_tuning(model, torch.optim.SGD(model.parameters(), lr=1.0)).remove()  # another optimizer


def test_fishmask_applied_again_with_another_keep_is_refused():
    from lightning_peft import apply_fishmask

    model = _tiny.llama()
    fisher = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0))
              for n, p in model.named_parameters()}
    apply_fishmask(model, fisher=fisher, keep=0.01)
    before = _state(model)
    with pytest.raises(ValueError, match="keep=0.01"):
        apply_fishmask(model, fisher=fisher, keep=0.05)
    assert _same(before, _state(model))
    assert apply_fishmask(model, fisher=fisher, keep=0.01) is model  # the same again stays harmless
    assert _same(before, _state(model))


@pytest.mark.parametrize("method, first, second, match", [
    ("p_tuning", dict(encoder_type="MLP"), dict(encoder_type="LSTM"), "encoder_type='MLP'"),
    ("multitask_prompt_tuning", dict(num_tasks=2), dict(num_tasks=3), "num_tasks=2"),
])
def test_prompt_applied_again_with_another_encoder_or_task_count_is_refused(method, first, second, match):
    import lightning_peft

    apply = getattr(lightning_peft, f"apply_{method}")
    model = apply(_tiny.llama(), num_virtual_tokens=2, **first)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        apply(model, num_virtual_tokens=2, **second)
    assert _same(before, _state(model))
    apply(model, num_virtual_tokens=2, **first)
    assert _same(before, _state(model))
