"""P-tuning: MLP and LSTM prompt encoders as HF PEFT's, files holding the encoder's outputs and
loading both ways with PEFT, KV-cached generation, and the (P1, x, P2, [MASK], P3) template with a
verbalizer on a tiny BertForMaskedLM."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

from lightning_peft import (
    PTuningConfig,
    apply_p_tuning,
    load_adapter,
    save_adapter,
    trainable_parameters,
    verbalizer_logits,
)
from lightning_peft._base import adapter_named_parameters, has_adapters
from tests import _tiny

N, MASK = 5, 4


def _ids(batch=2, length=7, vocab=96, seed=0):
    return torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _perturb(model, scale=0.5, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapter_named_parameters(model):
            param.add_(torch.randn(param.shape, generator=g) * scale)


@pytest.mark.parametrize("encoder_type", ["MLP", "LSTM"])
def test_files_hold_the_encoder_outputs_and_load_both_ways_with_peft(tmp_path, encoder_type):
    from peft import PeftModel, PromptEncoderConfig, get_peft_model
    from safetensors.torch import load_file

    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    model = apply_p_tuning(_tiny.llama(), num_virtual_tokens=N, encoder_type=encoder_type,
                           encoder_hidden_size=16)
    _perturb(model)
    layer = model.prompt_encoder
    counts = trainable_parameters(model).trainable
    assert counts == sum(p.numel() for p in layer.adapter_parameters().values()) > N * 32  # encoder too
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
    save_adapter(model, tmp_path / "ours")
    tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    with torch.no_grad():
        assert torch.equal(tensors["prompt_embeddings"], layer.encode()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(_tiny.llama(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids, attention_mask=mask).logits, ours)
    loaded = load_adapter(_tiny.llama(), tmp_path / "ours")
    assert loaded.prompt_encoder.inference and trainable_parameters(loaded).trainable == N * 32
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, ours)
    # a model whose encoder still trains cannot take the outputs back
    with pytest.raises(ValueError, match="still has its encoder"):
        load_adapter(model, tmp_path / "ours")

    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(_tiny.llama(), PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_reparameterization_type=encoder_type,
            encoder_hidden_size=16)).eval()
        with torch.no_grad():
            ref = theirs(input_ids=ids, attention_mask=mask).logits
        theirs.save_pretrained(str(tmp_path / "theirs"))
    mine = load_adapter(_tiny.llama(), tmp_path / "theirs")
    with torch.no_grad():
        assert torch.allclose(mine(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-6)


def test_the_encoder_is_peft_s_for_the_same_weights():
    from peft import PromptEncoderConfig, get_peft_model

    ids = _ids()
    for kind in ("MLP", "LSTM"):
        model = apply_p_tuning(_tiny.llama(), num_virtual_tokens=N, encoder_type=kind, encoder_hidden_size=8)
        _perturb(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft = get_peft_model(_tiny.llama(), PromptEncoderConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_reparameterization_type=kind,
                encoder_hidden_size=8)).eval()
        encoder = peft.prompt_encoder["default"]
        state = {"embedding.weight": model.prompt_encoder.embedding,
                 **{k: v for k, v in model.prompt_encoder.adapter_parameters().items() if k != "embedding"}}
        encoder.load_state_dict(state)
        with torch.no_grad():
            assert torch.allclose(peft(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_generation_with_cache_equals_without():
    model = apply_p_tuning(_tiny.llama(), num_virtual_tokens=N, encoder_type="LSTM", encoder_hidden_size=8)
    _perturb(model)
    ids = _ids(3, 5)
    with torch.no_grad():
        mask = torch.ones_like(ids)
        a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        b = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           use_cache=False)
    assert torch.equal(a, b)


def test_unknown_encoder_type_and_other_bad_arguments():
    with pytest.raises(ValueError, match=r"encoder_type must be one of \['MLP', 'LSTM'\], got 'GRU'"):
        PTuningConfig(encoder_type="GRU")
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PTuningConfig(num_virtual_tokens=-1)
    with pytest.raises(ValueError, match="template='mask' needs mask_token_id"):
        PTuningConfig(template="mask")
    with pytest.raises(ValueError, match="template_split must be three"):
        PTuningConfig(num_virtual_tokens=6, template="mask", mask_token_id=MASK, template_split=(1, 2, 2))
    with pytest.raises(ValueError, match="template must be one of"):
        PTuningConfig(template="suffix")
    model = _tiny.llama()
    with pytest.raises(ValueError, match="needs a bidirectional model"):
        apply_p_tuning(model, template="mask", mask_token_id=MASK, num_virtual_tokens=3)
    assert not has_adapters(model) and not model._forward_pre_hooks


def _bert_mlm(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32)
    return transformers.BertForMaskedLM(cfg).eval()


def _mlm_batch():
    ids = _ids(4, 8, vocab=60, seed=1)
    ids[:, 0] = 2  # [CLS]
    mask_at = [3, 5, 6, 4]
    for row, pos in enumerate(mask_at):
        ids[row, pos] = MASK
    attention = torch.ones_like(ids)
    attention[0, -1] = 0
    return ids, attention, mask_at


def test_mask_template_places_the_prompt_around_the_mask_and_trains_through_a_verbalizer():
    model = _bert_mlm()
    with torch.no_grad():  # a random MLM head scores all words alike: give the label words room
        model.get_input_embeddings().weight[10:14] *= 30  # (tied to the decoder)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_p_tuning(model, num_virtual_tokens=6, template="mask", template_split=(2, 3, 1), mask_token_id=MASK,
                   encoder_hidden_size=16)
    _perturb(model, 0.2)
    ids, attention, mask_at = _mlm_batch()
    layer = model.prompt_encoder
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention).logits  # (B, L+n, V)
        # the same layout built by hand: P1 x[:m] P2 [MASK] P3 x[m+1:]
        prompt = layer.encode()[0]
        words = model.get_input_embeddings()(ids)
        rows, masks = [], []
        for b, m in enumerate(mask_at):
            rows.append(torch.cat([prompt[:2], words[b, :m], prompt[2:5], words[b, m:m + 1], prompt[5:],
                                   words[b, m + 1:]]))
            masks.append(torch.cat([torch.ones(2), attention[b, :m], torch.ones(3), attention[b, m:m + 1],
                                    torch.ones(1), attention[b, m + 1:]]))
    assert out.shape == (4, 14, 60)
    by_hand = _bare_forward(model, torch.stack(rows), torch.stack(masks).long())
    assert torch.allclose(out, by_hand, atol=1e-5)
    label_words = [[10, 11], 12, 13]
    classes = verbalizer_logits(model, out, ids, label_words)
    at = out[torch.arange(4), torch.tensor(mask_at) + 2 + 3]
    assert torch.allclose(classes, torch.stack([at[:, [10, 11]].mean(-1), at[:, 12], at[:, 13]], -1))

    labels = torch.tensor([0, 1, 2, 0])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []  # trained in eval mode: BERT's dropout would make the few steps noisy
    for _ in range(15):
        logits = model(input_ids=ids, attention_mask=attention).logits
        loss = F.cross_entropy(verbalizer_logits(model, logits, ids, label_words), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name
    # MLM labels get -100 at the virtual positions: the loss is read at [MASK] only
    mlm_labels = torch.full_like(ids, -100)
    mlm_labels[torch.arange(4), torch.tensor(mask_at)] = 12
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention, labels=mlm_labels)
        pos = torch.tensor(mask_at) + 5
        manual = F.cross_entropy(out.logits[torch.arange(4), pos], torch.full((4,), 12))
        assert torch.allclose(out.loss, manual)
    with pytest.raises(ValueError, match="hold no \\[MASK\\] token"):
        model(input_ids=torch.full((1, 5), 7))


def _bare_forward(model, embeds, mask):
    """``model`` on ``inputs_embeds`` without the prompt hook."""
    layer = model.prompt_encoder
    saved = model._forward_pre_hooks.copy(), model._forward_pre_hooks_with_kwargs.copy()
    model._forward_pre_hooks.clear()
    try:
        with torch.no_grad():
            return model(inputs_embeds=embeds, attention_mask=mask).logits
    finally:
        model._forward_pre_hooks.update(saved[0])
        model._forward_pre_hooks_with_kwargs.update(saved[1])
        assert model.prompt_encoder is layer


def test_mask_template_round_trips(tmp_path):
    model = _bert_mlm()
    apply_p_tuning(model, num_virtual_tokens=6, template="mask", mask_token_id=MASK, encoder_hidden_size=8)
    _perturb(model)
    ids, attention, _ = _mlm_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention).logits
    save_adapter(model, tmp_path / "mask")
    other = load_adapter(_bert_mlm(), tmp_path / "mask")
    assert other.prompt_encoder.template == "mask" and other.prompt_encoder.split() == (2, 2, 2)
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids, attention_mask=attention).logits, out)


def test_lightning_fit_with_the_classification_data_module(tmp_path):
    import lightning as L

    from lightning_peft import PTuningCallback
    from lightning_peft.data import ClassificationDataModule
    from lightning_peft.tasks import SequenceClassificationModule

    records = [{"text": "good bike", "text_pair": "a bike", "label": 1},
               {"text": "bad bike", "text_pair": "no bike", "label": 0}] * 4
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "bike", "a", "no"]
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = SequenceClassificationModule(model, lr=1e-2, warmup_steps=0)
    callback = PTuningCallback(num_virtual_tokens=3, encoder_hidden_size=8, adapter_dir=str(tmp_path / "pt"))
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, max_steps=3, callbacks=[callback]).fit(
        module, ClassificationDataModule(tok, records, batch_size=4))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    batch = tok(["good bike"], ["a bike"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    loaded = load_adapter(transformers.BertForSequenceClassification(model.config).eval(), tmp_path / "pt")
    with torch.no_grad():  # (a fresh head: compare the prompts, then the logits with this model's head)
        assert torch.allclose(loaded.prompt_encoder.embedding, model.prompt_encoder.encode()[0], atol=1e-6)
        loaded.load_state_dict({k: v for k, v in model.state_dict().items() if "prompt_encoder" not in k},
                               strict=False)
        assert torch.allclose(loaded(**batch).logits, trained, atol=1e-5)
