"""Prompt tuning (and the virtual-token machinery P-tuning and MPT share): the loss ignores the
virtual tokens, generation with the KV cache equals generation without it and HF PEFT's, training
on Llama, GPT-2 and BERT lowers the loss and leaves the base bit for bit, files load both ways with
HF PEFT, the shipped generate_answers works unchanged, bad arguments change nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_peft import (
    PromptTuningConfig,
    apply_prompt_tuning,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from lightning_peft._base import adapter_named_parameters, has_adapters
from tests import _tiny

N = 4


def _ids(batch: int = 2, length: int = 7, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _perturb(model, scale: float = 1.0, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapter_named_parameters(model):
            param.add_(torch.randn(param.shape, generator=g) * scale)


def _peft_model(model, config):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config).eval()


def test_logits_cover_the_virtual_tokens_and_the_loss_ignores_them():
    model = apply_prompt_tuning(_tiny.llama(), num_virtual_tokens=N, init="sample_vocab")
    _perturb(model, 0.3)
    ids = _ids()
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt part without loss
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert out.logits.shape == (2, N + 7, 96)
    # the loss is the usual shifted cross-entropy over the real labels only
    extended = torch.cat([torch.full((2, N), -100), labels], dim=1)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 96), extended[:, 1:].reshape(-1),
                             ignore_index=-100)
    assert torch.allclose(out.loss, manual, atol=1e-6)
    real = F.cross_entropy(out.logits[:, N + 1:-1].reshape(-1, 96), labels[:, 2:].reshape(-1))
    first = F.cross_entropy(out.logits[:, N + 1], labels[:, 2])  # the first labelled token
    assert torch.allclose(manual, real, atol=1e-6) and first.isfinite()
    # and equals HF PEFT's for the same prompt
    from peft import PromptTuningConfig as PeftConfig

    peft = _peft_model(_tiny.llama(), PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(model.prompt_encoder.embedding)
        ref = peft(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert torch.equal(ref.logits, out.logits.detach()) and torch.allclose(ref.loss, out.loss)


def _train(model, batches, steps: int = 12, lr: float = 0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _bert_batch():
    ids = _ids(4, 6, vocab=60)
    types = torch.zeros_like(ids)
    types[:, 3:] = 1
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels": torch.tensor([0, 1, 2, 1])}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_training_lowers_the_loss_and_keeps_the_base(arch):
    model = getattr(_tiny, arch)()
    if arch == "bert":  # a random head gives near-constant logits: give the classes room
        model.classifier.weight.data.mul_(30)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_prompt_tuning(model, num_virtual_tokens=N)
    dim = model.get_input_embeddings().weight.shape[1]
    assert trainable_parameters(model).trainable == N * dim
    if arch == "bert":
        batch = _bert_batch()
    else:
        vocab = model.config.vocab_size
        ids = _ids(4, 8, vocab=vocab)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = model.prompt_encoder.embedding.detach().clone()
    losses = _train(model, [batch], steps=15, lr=0.3)
    assert losses[-1] < losses[0] - 0.02, losses  # a random tiny model: small but clear steps
    assert not torch.equal(model.prompt_encoder.embedding, before)
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name
            assert not param.requires_grad


def test_bert_classification_matches_peft_with_token_type_ids():
    from peft import PromptTuningConfig as PeftConfig

    model = apply_prompt_tuning(_tiny.bert(), num_virtual_tokens=N)
    _perturb(model)
    peft = _peft_model(_tiny.bert(), PeftConfig(task_type="SEQ_CLS", num_virtual_tokens=N))
    batch = _bert_batch()
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(model.prompt_encoder.embedding)
        ours = model(**batch)
        ref = peft(**batch)
    assert ours.logits.shape == (4, 3)
    assert torch.allclose(ours.logits, ref.logits, atol=1e-6)
    assert torch.allclose(ours.loss, ref.loss, atol=1e-6)


def _greedy(model, ids, steps):
    cur = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=cur, attention_mask=torch.ones_like(cur)).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], dim=1)
    return cur


def test_generation_with_cache_equals_without_and_peft(tmp_path):
    model = apply_prompt_tuning(_tiny.llama(), num_virtual_tokens=N)
    ids = _ids(3, 6)
    _train(model, [{"input_ids": ids, "labels": ids}], steps=6)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               use_cache=False)
    assert torch.equal(cached, plain) and torch.equal(cached, _greedy(model, ids, 8))
    # left padding: the positions of the real tokens are kept, cache or not
    padded = torch.cat([torch.zeros(3, 2, dtype=torch.long), ids], dim=1)
    pmask = torch.cat([torch.zeros(3, 2, dtype=torch.long), mask], dim=1)
    pmask[0, 2] = 0
    with torch.no_grad():
        a = model.generate(input_ids=padded, attention_mask=pmask, max_new_tokens=6, do_sample=False)
        b = model.generate(input_ids=padded, attention_mask=pmask, max_new_tokens=6, do_sample=False,
                           use_cache=False)
    assert torch.equal(a, b)
    # HF PEFT on the same adapter (its cached generate re-inserts the prompt at every step under
    # transformers 5, which renamed past_key_values to cache: compared without the cache)
    from peft import PeftModel

    save_adapter(model, tmp_path / "pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(_tiny.llama(), str(tmp_path / "pt")).eval()
        with torch.no_grad():
            ref = peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                use_cache=False)
    assert torch.equal(ref, cached)


def test_files_load_both_ways_with_peft(tmp_path):
    from peft import PeftModel
    from peft import PromptTuningConfig as PeftConfig

    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    model = apply_prompt_tuning(_tiny.llama(), num_virtual_tokens=N)
    _perturb(model)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
    save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(_tiny.llama(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids, attention_mask=mask).logits, ours)

    torch.manual_seed(7)
    theirs = _peft_model(_tiny.llama(), PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                   prompt_tuning_init="SAMPLE_VOCAB"))
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask).logits
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = load_adapter(_tiny.llama(), tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, ref)
    assert trainable_parameters(loaded).trainable == N * 32


def test_text_init_repeats_or_cuts_the_text_as_peft():
    tok = _tiny.tokenizer(["classify this review please", "good bad"], vocab_size=300)
    text_ids = tok("classify this")["input_ids"]
    for n in (1, len(text_ids) + 3):
        model = _tiny.llama(vocab=len(tok))
        apply_prompt_tuning(model, num_virtual_tokens=n, init="text", init_text="classify this",
                            tokenizer=tok)
        want = (text_ids * n)[:n]
        assert torch.equal(model.prompt_encoder.embedding, model.get_input_embeddings().weight[want])


def test_generate_answers_works_unchanged():
    from lightning_peft.evaluation import encode_prompt, generate_answers

    records = [{"instruction": "Say hello.", "input": ""},
               {"instruction": "Name a colour, please, any colour.", "input": "red or blue"}]
    tok = _tiny.tokenizer([r["instruction"] + r["input"] for r in records], vocab_size=300)
    model = apply_prompt_tuning(_tiny.llama(vocab=len(tok)), num_virtual_tokens=N, init="sample_vocab")
    answers = generate_answers(model, tok, records, max_new_tokens=5, batch_size=2)
    assert generate_answers(model, tok, records, max_new_tokens=5, batch_size=1) == answers
    for record, answer in zip(records, answers, strict=True):
        prompt = torch.tensor([encode_prompt(tok, record["instruction"], record["input"])])
        tokens = _greedy(model, prompt, 5)[0, prompt.shape[1]:].tolist()
        if tok.eos_token_id in tokens:
            tokens = tokens[:tokens.index(tok.eos_token_id)]
        assert answer == tok.decode(tokens, skip_special_tokens=True).strip()


def test_apply_is_idempotent_and_positional_calls_work():
    model = apply_prompt_tuning(_tiny.llama(), num_virtual_tokens=N)
    layer = model.prompt_encoder
    apply_prompt_tuning(model, num_virtual_tokens=N)
    assert model.prompt_encoder is layer and len(model._forward_pre_hooks) == 1
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
    (dict(num_virtual_tokens=True), "num_virtual_tokens"),
    (dict(num_virtual_tokens=64), "num_virtual_tokens=64 leaves no room"),
    (dict(init="vocab"), r"init must be one of \['random', 'sample_vocab', 'text'\]"),
    (dict(init="text"), "init='text' needs init_text"),
    (dict(init="text", init_text="hello"), "needs a tokenizer"),
    (dict(init="random", init_text="hello"), "init_text is only used with init='text'"),
    (dict(init="text", init_text="  ", tokenizer="x"), "init_text must be a non-empty string"),
])
def test_bad_arguments_change_nothing(kwargs, match):
    model = _tiny.llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        apply_prompt_tuning(model, **kwargs)
    assert not has_adapters(model) and not model._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_text_outside_the_vocabulary_is_refused():
    tok = _tiny.tokenizer(["some words to learn from"], vocab_size=300)
    model = _tiny.llama(vocab=40)  # smaller than the tokenizer's
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        apply_prompt_tuning(model, init="text", init_text="some words to learn from", tokenizer=tok,
                            num_virtual_tokens=N)
    assert not has_adapters(model)


def test_config_object_and_callback():
    from lightning_peft import PromptTuningCallback, apply_peft

    config = PromptTuningConfig(num_virtual_tokens=3, init="sample_vocab")
    model = apply_peft(_tiny.llama(), config)
    assert model.prompt_encoder.embedding.shape == (3, 32)
    callback = PromptTuningCallback(num_virtual_tokens=3)
    assert callback.config == PromptTuningConfig(num_virtual_tokens=3)


def test_lightning_fit_with_the_instruction_data_module(tmp_path):
    import lightning as L

    from lightning_peft import PromptTuningCallback
    from lightning_peft.data import InstructionDataModule
    from lightning_peft.tasks import CausalLMModule

    records = [{"instruction": "Say hello.", "input": "", "output": "hello"},
               {"instruction": "Name a colour.", "input": "", "output": "red"}] * 2
    tok = _tiny.tokenizer([r["instruction"] + " " + r["output"] for r in records], vocab_size=300)
    model = _tiny.llama(vocab=len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = CausalLMModule(model, lr=1e-2, warmup_steps=0)
    callback = PromptTuningCallback(num_virtual_tokens=3, adapter_dir=str(tmp_path / "pt"))
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, max_steps=2, callbacks=[callback]).fit(
        module, InstructionDataModule(tok, records, batch_size=2))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    loaded = load_adapter(_tiny.llama(vocab=len(tok)), tmp_path / "pt")
    assert torch.equal(loaded.prompt_encoder.embedding, model.prompt_encoder.embedding)


@pytest.mark.parametrize("apply_name, kwargs", [
    ("apply_prompt_tuning", {}),
    ("apply_p_tuning", {}),
    ("apply_multitask_prompt_tuning", {"num_tasks": 2}),
])
def test_prompt_methods_refuse_encoder_decoder_models(apply_name, kwargs):
    """On T5 the prompt went into the encoder's embeddings only through the model's forward:
    ``generate`` calls the encoder directly and ignored it, and decoder labels were padded as if
    they were the encoder's input. Refused, naming the model type, as prefix tuning refuses it."""
    import transformers

    import lightning_peft

    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"prompt methods support decoder-only and encoder-only models; "
                                         r"model type 't5' is an encoder-decoder model"):
        getattr(lightning_peft, apply_name)(model, num_virtual_tokens=4, **kwargs)
    assert [(n, type(m)) for n, m in model.named_modules()] == before


@pytest.mark.parametrize("apply", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_a_seq_cls_file_without_the_head_warns_that_peft_cannot_load_it(apply, tmp_path):
    """HF PEFT's PeftModelForSequenceClassification always trains and saves the head and loads a
    SEQ_CLS file only with it: saving a prompt whose head is frozen warns (the file still loads
    here); with ``modules_to_save=["classifier"]`` nothing warns and PEFT loads the file (not
    a BERT prefix: PEFT's prefix tuning needs a model that takes past key values)."""
    import peft

    import lightning_peft

    fn = getattr(lightning_peft, f"apply_{apply}")
    with pytest.warns(UserWarning, match=r"SEQ_CLS.*modules_to_save=\['classifier'\]"):
        save_adapter(fn(_tiny.bert(), num_virtual_tokens=N), tmp_path / "frozen")
    assert load_adapter(_tiny.bert(), tmp_path / "frozen") is not None
    model = fn(_tiny.bert(), num_virtual_tokens=N, modules_to_save=["classifier"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path / "head")
    if apply == "prefix_tuning":
        return
    batch = _bert_batch()
    model.eval()
    theirs = peft.PeftModel.from_pretrained(_tiny.bert(), str(tmp_path / "head")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)
