"""Prompt tuning and P-tuning on an encoder classifier: a fresh head trained beside the prompt
(``modules_to_save``, as HF PEFT's SEQ_CLS models train it), saved in PEFT's keys and loaded both
ways."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lightning_peft import (
    PromptTuningConfig,
    PTuningConfig,
    apply_p_tuning,
    apply_prompt_tuning,
    load_adapter,
    save_adapter,
)
from lightning_peft._base import adapter_named_parameters, has_adapters
from lightning_peft.methods._virtual_tokens import PrefixModulesToSave
from tests import _tiny

N = 4


def _peft_config(method: str):
    from peft import PromptEncoderConfig
    from peft import PromptTuningConfig as PeftPromptTuningConfig

    if method == "prompt_tuning":
        return PeftPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)
    return PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=N, encoder_hidden_size=8)


METHODS = {  # name: (apply, config class)
    "prompt_tuning": (apply_prompt_tuning, PromptTuningConfig),
    "p_tuning": (apply_p_tuning, PTuningConfig),
}


def _cls_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (8, 6), generator=g)
    return ids, torch.ones_like(ids), torch.randint(0, 3, (8,), generator=g)


def _trained_classifier(method: str):
    model = METHODS[method][0](_tiny.bert(), num_virtual_tokens=N, modules_to_save=["classifier"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, param in adapter_named_parameters(model):
            param.add_(torch.randn(param.shape, generator=g) * 0.5)
    return model.eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_fresh_classifier_trains_with_the_prompt(method):
    model = METHODS[method][0](_tiny.bert(), num_virtual_tokens=N, modules_to_save=["classifier"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(list(_tiny.bert().parameters()))  # the whole base model, head included
    head = model.classifier.modules_to_save.weight.detach().clone()
    assert model.classifier.modules_to_save.weight.requires_grad
    ids, mask, labels = _cls_batch()
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert not torch.equal(model.classifier.modules_to_save.weight, head)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert set(frozen) == {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_classifier_round_trip(tmp_path, method):
    ours = _trained_classifier(method)
    ids, mask, _ = _cls_batch()
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).logits
    save_adapter(ours, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "a" / "adapter_model.safetensors"))) == [
        "base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]  # PEFT's keys
    loaded = load_adapter(_tiny.bert(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_classifier_files_load_both_ways_with_peft(tmp_path, method):
    from peft import PeftModel, get_peft_model

    ours = _trained_classifier(method)
    ids, mask, _ = _cls_batch()
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).logits
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(_tiny.bert(), str(tmp_path / "ours")).eval()
    with torch.no_grad():  # PEFT's own SEQ_CLS prompt forward
        assert torch.equal(theirs(input_ids=ids, attention_mask=mask).logits, expected)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(_tiny.bert(), _peft_config(method)).eval()
    with torch.no_grad():
        peft_model.base_model.classifier.modules_to_save["default"].weight.add_(1.0)
        peft_expected = peft_model(input_ids=ids, attention_mask=mask).logits
    peft_model.save_pretrained(str(tmp_path / "peft"))  # lists modules_to_save "classifier", "score"
    mine = load_adapter(_tiny.bert(), tmp_path / "peft")
    assert isinstance(mine.classifier, PrefixModulesToSave)
    with torch.no_grad():
        assert torch.equal(mine(input_ids=ids, attention_mask=mask).logits, peft_expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_modules_to_save_naming_a_missing_module_changes_nothing(method):
    apply, config_class = METHODS[method]
    model = _tiny.bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no_such_head"):
        apply(model, num_virtual_tokens=N, modules_to_save=["no_such_head"])
    assert not has_adapters(model) and all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="modules_to_save"):
        config_class(modules_to_save=[3])
