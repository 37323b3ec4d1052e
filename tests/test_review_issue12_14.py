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
