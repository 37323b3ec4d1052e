"""Which modules LoRA targets: HF PEFT's per-architecture defaults (checked against peft's own table
and against tiny models of those architectures, built offline), and error messages that say when
a ``target_modules`` was the default rather than the user's."""

import types

import pytest
import torch
import transformers
from torch import nn

import kernels
from lightning_peft import apply_lora
from lightning_peft.methods.lora import lora_layers
from lightning_peft.targeting import DEFAULT_TARGETS, find_targets, is_linear_like

# Where our table departs from (or adds to) HF PEFT's, and why (documented in targeting.py).
_CORRECTIONS = {"phi3": ["qkv_proj"]}  # PEFT has no entry; Phi-3 fuses q/k/v into qkv_proj


def test_default_table_is_peft_for_every_model_type():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    missing = sorted(set(peft_map) - set(DEFAULT_TARGETS))
    assert not missing, f"model types PEFT defaults and we do not: {missing}"
    for kind, targets in peft_map.items():
        assert DEFAULT_TARGETS[kind] == _CORRECTIONS.get(kind, targets), kind
    for kind, targets in _CORRECTIONS.items():
        assert DEFAULT_TARGETS[kind] == targets


def _small(**extra):
    return dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=64, **extra)


_TINY = {  # model_type -> (config class, model class, config kwargs)
    "phi": ("PhiConfig", "PhiForCausalLM", _small()),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _small(num_key_value_heads=2, pad_token_id=0,
                                                        bos_token_id=1, eos_token_id=2)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                   rotary_dim=8, bos_token_id=0, eos_token_id=0)),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64)),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", _small()),
    "deberta": ("DebertaConfig", "DebertaForSequenceClassification", _small()),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=32, n_layers=1, n_heads=2, vocab_size=64)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _small(num_key_value_heads=2)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)),
}


@pytest.mark.parametrize("kind", sorted(_TINY))
def test_default_targets_exist_in_tiny_models(kind):
    config_cls, model_cls, kwargs = _TINY[kind]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    assert model.config.model_type == kind
    ids = torch.randint(0, 64, (1, 5))
    before = model(ids).logits
    apply_lora(model, r=2)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)}
    assert leaves == set(DEFAULT_TARGETS[kind])  # every default entry names modules that exist
    torch.testing.assert_close(model(ids).logits, before)  # B = 0: the base model's output


class _Typed(nn.Module):
    """A model that says it is a ``kind`` but has none of that architecture's default modules."""

    def __init__(self, kind: str, child: nn.Module) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(model_type=kind)
        self.fc = child


def test_errors_say_when_target_modules_was_the_default():
    with pytest.raises(ValueError, match=r"default target_modules of model type 'llama' "
                                         r"\(\['q_proj', 'v_proj'\]\)") as err:
        find_targets(_Typed("llama", nn.Linear(4, 4)))
    assert "matched no module" in str(err.value) and "fc" in str(err.value)
    with pytest.raises(ValueError, match=r"default target_modules of model type 't5'"):
        find_targets(nn.Sequential(_Typed("t5", nn.Linear(4, 4)), nn.ModuleDict({"q": nn.ReLU()})))
    with pytest.raises(ValueError, match=r"^target_modules was not given and there is no default "
                                         r"for model type 'unknown-arch'"):
        find_targets(_Typed("unknown-arch", nn.Linear(4, 4)))
    # a target_modules the user passed is named as theirs
    with pytest.raises(ValueError, match=r"^target_modules=\['nope'\] matched no module"):
        find_targets(_Typed("llama", nn.Linear(4, 4)), ["nope"])


def test_nf4_base_is_recognised_by_its_weight():
    class FourBit(nn.Module):  # not lightning_peft.methods.qlora.NF4Linear: only the weight says 4-bit
        def __init__(self):
            super().__init__()
            self.weight = kernels.quantize_nf4(torch.randn(8, 64))

    assert is_linear_like(FourBit())
    assert not is_linear_like(nn.Conv2d(2, 2, 1))
    model = nn.Sequential(FourBit(), nn.ReLU())
    assert find_targets(model, "all-linear") == ["0"]


@pytest.mark.parametrize("method, kwargs, arg, entry", [
    ("apply_lora", {"target_modules": ["q_proj", "v_porj"]}, "target_modules", "v_porj"),
    ("apply_lora", {"target_modules": ["q_proj"], "exclude_modules": ["layers.0.self_attn.q_proj", "nope"]},
     "exclude_modules", "nope"),
    ("apply_ia3", {"target_modules": ["k_proj", "vproj"], "feedforward_modules": []},
     "target_modules", "vproj"),
    ("apply_dylora", {"target_modules": ["q_proj", "q.proj"]}, "target_modules", "q.proj"),
    ("apply_adalora", {"target_modules": ["q_proj", "v"], "total_step": 10}, "target_modules", "v"),
    ("apply_adapters", {"target_modules": ["o_proj", "v_porj"], "bottleneck": 4}, "target_modules", "v_porj"),
])
def test_every_list_entry_must_match_a_module(method, kwargs, arg, entry):
    """An entry of a ``target_modules``/``exclude_modules`` list that matches nothing is an error
    naming it and the modules that exist, before the model changes (a misspelt entry beside a
    good one used to leave its layers out, or in, silently)."""
    import lightning_peft
    from tests import _tiny

    model = _tiny.llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=rf"{arg} entry '{entry}' of .* matches no module of "
                                         rf"LlamaForCausalLM\. Linear/Conv1D module names: \[.*'q_proj'"):
        getattr(lightning_peft, method)(model, **kwargs)
    assert [(n, type(m)) for n, m in model.named_modules()] == before


def test_a_file_may_list_entries_of_other_architectures(tmp_path):
    """HF PEFT needs one entry of a file's ``target_modules`` to match (configs shared across
    architectures list both Llama's and BERT's names): such a file loads, adapting what matches."""
    import warnings

    import peft

    from lightning_peft import load_adapter
    from tests import _tiny

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_tiny.llama(), peft.LoraConfig(
            r=2, target_modules=["q_proj", "v_proj", "query", "value"], exclude_modules=["key"]))
        theirs.save_pretrained(tmp_path)
    model = load_adapter(_tiny.llama(), tmp_path)
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)}) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("apply", ["apply_lora", "apply_qlora", "apply_adalora", "apply_relora"])
def test_modules_to_save_may_be_one_name(apply):
    """``modules_to_save="lm_head"`` is one module, as the configs read it (QLoRA, AdaLoRA and
    ReLoRA split it into characters: "entry 'l' matches no module")."""
    import lightning_peft
    from lightning_peft._base import ModulesToSave
    from tests import _tiny

    apply_fn = getattr(lightning_peft, apply)
    model = apply_fn(_tiny.llama(), target_modules=["q_proj"], modules_to_save="lm_head")
    assert isinstance(model.lm_head, ModulesToSave)


def test_all_linear_in_any_case_and_never_a_tied_head_with_token_rows():
    """``"All-Linear"`` selects what ``"all-linear"`` does (HF PEFT lowers it; it matched no module
    here). A tied head wrapped for its trainable-token rows stays out of "all-linear": applying
    LoRA again (or a callback's second stage) refused it as another method's layer."""
    from lightning_peft import apply_lora
    from lightning_peft.targeting import find_targets
    from tests import _tiny

    model = _tiny.llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert find_targets(model, "All-Linear") == find_targets(model, "all-linear")
    apply_lora(model, r=2, target_modules="all-linear", trainable_token_indices=[3, 5])
    assert "lm_head" not in find_targets(model, "all-linear")
    apply_lora(model, r=2, target_modules="ALL-LINEAR", trainable_token_indices=[3, 5])  # again: fine


def test_peft_callback_builds_the_methods_own_class_not_a_subclass():
    """A user's ``class X(LoRACallback)`` inherits ``method = "lora"`` and took the name over."""
    from lightning_peft import LoRACallback
    from lightning_peft.callbacks import peft_callback

    class LoggingLoRA(LoRACallback):
        pass

    assert type(peft_callback("lora", r=4)) is LoRACallback
    assert type(peft_callback("rslora", r=4)) is LoRACallback
