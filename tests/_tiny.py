"""Tiny random transformers models built from configs (no downloads)."""

import torch
import transformers


def llama(seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 96):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=24, n_layer=2, n_head=2, vocab_size=50, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def t5(seed: int = 0):
    """A tiny T5 (its feed-forward reads ``wo.weight`` for the dtype; one weight under three
    embedding modules and the tied head)."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                num_decoder_layers=2, num_heads=2, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def randomize_lora(model, seed: int = 1) -> None:
    """Give every lora_B a nonzero value so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B") or name.endswith("lora_B.weight") or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)


CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""A ChatML template like SmolLM2's, without its default system prompt."""


def tokenizer(corpus: list[str], vocab_size: int = 400, chat_template: bool = True,
              pad_is_eos: bool = False):
    """A byte-level BPE tokenizer trained here on ``corpus`` (decoding is exact); EOS
    ``<|im_end|>`` is id 0, pad is ``<pad>`` (or the EOS with ``pad_is_eos``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|im_end|>", "<|im_start|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(list(corpus) * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                  pad_token="<|im_end|>" if pad_is_eos else "<pad>")
    tok.chat_template = CHAT_TEMPLATE if chat_template else None
    return tok


def assert_runs_on_t5(apply) -> None:
    """``apply(model)`` (a method on a fresh tiny T5) wraps ``wo``, whose ``.weight`` T5's
    feed-forward reads through the wrapper: the fresh adapter computes the base model, and its
    trainable tensors get gradients."""
    from lightning_peft._base import adapter_named_parameters

    ids, dec = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[0, 5, 6]])
    base = t5()
    with torch.no_grad():
        want = base(input_ids=ids, decoder_input_ids=dec).logits
    model = apply(t5())
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo is not base.encoder.block[0].layer[1].DenseReluDense.wo and wo.weight is wo.base_layer.weight
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=dec).logits, want,
                                   rtol=1e-5, atol=1e-6)
    model.train()
    model(input_ids=ids, decoder_input_ids=dec, labels=dec).loss.backward()
    grads = [p.grad for _, p in adapter_named_parameters(model)]
    assert grads and all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
