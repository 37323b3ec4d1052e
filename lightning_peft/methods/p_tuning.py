"""P-tuning: virtual tokens produced by a small trainable prompt encoder (Liu et al., 2021, "GPT
Understands, Too", arXiv 2103.10385)::

    h_1..h_n = MLP(e_1..e_n)                  encoder_type="MLP": Linear-ReLU-Linear-ReLU-Linear
    h_1..h_n = MLP(BiLSTM(e_1..e_n))          encoder_type="LSTM": bidirectional LSTM, then
                                              Linear(2H, 2H)-ReLU-Linear(2H, d)
    e (n, d) trainable embeddings, H = encoder_hidden_size, the h (n, d) are the virtual tokens

The encoder couples the virtual tokens, which trains more stably than free embeddings. Layouts
(``template``)::

    "prefix"   [ h_1..h_n ; x ]                          HF PEFT's layout (files load in PEFT)
    "mask"     [ P1 ; x ; P2 ; [MASK] ; P3 ]             the paper's template for a bidirectional
                                                         model (BERT), P1|P2|P3 = template_split

With ``"mask"`` the label is read at [MASK]: :func:`verbalizer_logits` turns the masked-LM logits
there into class logits through label words (a verbalizer). The insertion (a forward pre-hook,
KV-cached generation included) is :mod:`lightning_peft.methods._virtual_tokens`.

As HF PEFT, the file holds the encoder's outputs, not the encoder: ``prompt_embeddings`` (n, d)
= ``h``. Loading a file gives an inference-mode prompt holding just those embeddings
(``P_TUNING`` files of PEFT load the same way, and ours in ``PeftModel.from_pretrained``).
``adapter_config.json`` holds PEFT's ``encoder_reparameterization_type``,
``encoder_hidden_size``, ``encoder_num_layers``, ``encoder_dropout``, and, for ``"mask"`` only, our
``template``, ``template_split`` and ``mask_token_id`` (PEFT ignores them with a warning and would
read the prompt as a prefix).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.methods import Method, register
from lightning_peft.methods._virtual_tokens import (
    TEMPLATES,
    VirtualTokens,
    check_choice,
    check_common_json,
    check_num_virtual_tokens,
    common_json,
    install,
    is_causal_lm,
    prompt_layer,
    read_modules_to_save,
    token_dim,
    transformers_root,
)
from lightning_peft.targeting import check_module_names

ENCODER_TYPES = ("MLP", "LSTM")


# --------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------


@dataclass
class PTuningConfig:
    """What :func:`apply_p_tuning` injects."""

    num_virtual_tokens: int = 20
    """n, the number of virtual tokens."""
    encoder_type: str = "MLP"
    """The prompt encoder: ``"MLP"`` or ``"LSTM"`` (HF PEFT's ``encoder_reparameterization_type``)."""
    encoder_hidden_size: int | None = None
    """H, the encoder's hidden width; None: the model's hidden size (as HF PEFT)."""
    encoder_num_layers: int = 2
    """LSTM layers; the MLP always has three linear layers (HF PEFT warns and ignores it)."""
    encoder_dropout: float = 0.0
    """Dropout between the LSTM's layers."""
    template: str = "prefix"
    """``"prefix"`` (HF PEFT's layout) or ``"mask"`` ((P1, x, P2, [MASK], P3), bidirectional models)."""
    template_split: tuple[int, int, int] | None = None
    """(|P1|, |P2|, |P3|) for ``"mask"``, summing to ``num_virtual_tokens``; None: n - 2⌊n/3⌋,
    ⌊n/3⌋, ⌊n/3⌋."""
    mask_token_id: int | None = None
    """The [MASK] token id (``tokenizer.mask_token_id``), needed by ``"mask"``."""
    modules_to_save: list[str] | None = None
    """Modules trained in full, as trainable copies (a fresh classifier head: ``["classifier"]``,
    as HF PEFT's ``SEQ_CLS``)."""

    def __post_init__(self) -> None:
        n = check_num_virtual_tokens(self.num_virtual_tokens)
        self.modules_to_save = check_module_names(self.modules_to_save, "modules_to_save")
        if not isinstance(self.encoder_type, str) or self.encoder_type.upper() not in ENCODER_TYPES:
            raise ValueError(f"encoder_type must be one of {list(ENCODER_TYPES)}, got {self.encoder_type!r}")
        self.encoder_type = self.encoder_type.upper()
        for name in ("encoder_hidden_size", "encoder_num_layers"):
            value = getattr(self, name)
            if value is None and name == "encoder_hidden_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.encoder_dropout, bool) or not isinstance(self.encoder_dropout, (int, float)) \
                or not 0 <= self.encoder_dropout < 1:
            raise ValueError(f"encoder_dropout must be a number in [0, 1), got {self.encoder_dropout!r}")
        self.template = check_choice(self.template, "template", TEMPLATES)
        if self.template_split is not None:
            split = self.template_split
            if self.template != "mask":
                raise ValueError("template_split is only used with template='mask'")
            if not isinstance(split, (tuple, list)) or len(split) != 3 or any(
                    isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in split) or sum(split) != n:
                raise ValueError(f"template_split must be three non-negative integers (|P1|, |P2|, |P3|) "
                                 f"summing to num_virtual_tokens={n}, got {split!r}")
            self.template_split = tuple(split)
        if self.mask_token_id is not None and (isinstance(self.mask_token_id, bool)
                                               or not isinstance(self.mask_token_id, int)
                                               or self.mask_token_id < 0):
            raise ValueError(f"mask_token_id must be a non-negative token id, got {self.mask_token_id!r}")
        if self.template == "mask" and self.mask_token_id is None:
            raise ValueError("template='mask' needs mask_token_id (the tokenizer's mask_token_id)")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# 2. Module
# --------------------------------------------------------------------------------------------


class PromptEncoder(VirtualTokens):
    """Trainable embeddings ``embedding`` (n, d) and the encoder (``mlp_head``, and ``lstm_head``
    for ``"LSTM"``) whose outputs are the prompt; in inference mode (``encoder_type=None``: a
    loaded file) ``embedding`` holds the outputs themselves. All float32, as HF PEFT."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, encoder_type: str | None,
                 hidden_size: int, num_layers: int = 2, dropout: float = 0.0, device: Any = None,
                 **layout: Any) -> None:
        super().__init__(num_virtual_tokens, token_dim, **layout)
        kw = {"device": device, "dtype": torch.float32}
        self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, token_dim, **kw))  # (n, d)
        self.encoder_type, self.hidden_size = encoder_type, hidden_size
        self.num_layers, self.dropout = num_layers, dropout
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(token_dim, hidden_size, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden_size, 2 * hidden_size, **kw), nn.ReLU(),
                                          nn.Linear(2 * hidden_size, token_dim, **kw))
        elif encoder_type == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden_size, **kw), nn.ReLU(),
                                          nn.Linear(hidden_size, hidden_size, **kw), nn.ReLU(),
                                          nn.Linear(hidden_size, token_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.embedding.is_meta:
            with torch.no_grad():
                nn.init.normal_(self.embedding)  # nn.Embedding's default, as PEFT's

    @property
    def inference(self) -> bool:
        """Whether the prompt is fixed embeddings (no encoder)."""
        return self.mlp_head is None

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        params = {"embedding": self.embedding}
        for head in ("lstm_head", "mlp_head"):
            module = getattr(self, head)
            if module is not None:
                params.update((f"{head}.{n}", p) for n, p in module.named_parameters())
        return params

    def encode(self) -> Tensor:
        """The virtual tokens h (1, n, d)."""
        e = self.embedding.unsqueeze(0)  # (1, n, d)
        if self.inference:
            return e
        if self.lstm_head is not None:
            e = self.lstm_head(e)[0]  # (1, n, 2H)
        return self.mlp_head(e)  # (1, n, d)

    def prompt(self, batch_size: int, task_ids: Tensor | None) -> Tensor:
        return self.encode().expand(batch_size, -1, -1)  # one pass through the encoder, as PEFT

    def file_tensors(self) -> dict[str, Tensor] | None:
        """While the encoder trains, the file holds its outputs (HF PEFT's ``prompt_embeddings``),
        computed in eval mode (no dropout)."""
        if self.inference:
            return None
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return {"embedding": self.encode()[0].detach()}
        finally:
            self.train(was_training)


# --------------------------------------------------------------------------------------------
# 3. apply_p_tuning and the verbalizer
# --------------------------------------------------------------------------------------------


def apply_p_tuning(model: nn.Module, num_virtual_tokens: int = 20, encoder_type: str = "MLP",
                   encoder_hidden_size: int | None = None, encoder_num_layers: int = 2,
                   encoder_dropout: float = 0.0, template: str = "prefix",
                   template_split: Sequence[int] | None = None, mask_token_id: int | None = None,
                   modules_to_save: Sequence[str] | None = None,
                   config: PTuningConfig | None = None) -> nn.Module:
    """Insert ``num_virtual_tokens`` virtual tokens made by a prompt encoder into every input of
    the transformers model in ``model`` (see the module docstring), freeze everything else, return
    ``model``. Everything is checked before the model changes; applying twice is harmless."""
    cfg = config if config is not None else PTuningConfig(
        num_virtual_tokens=num_virtual_tokens, encoder_type=encoder_type,
        encoder_hidden_size=encoder_hidden_size, encoder_num_layers=encoder_num_layers,
        encoder_dropout=encoder_dropout, template=template,
        template_split=tuple(template_split) if template_split is not None else None,
        mask_token_id=mask_token_id,
        modules_to_save=modules_to_save)
    return _install(model, cfg, cfg.encoder_type)


def _install(model: nn.Module, cfg: PTuningConfig, encoder_type: str | None) -> nn.Module:
    root = transformers_root(model)
    if cfg.template == "mask" and is_causal_lm(root):
        raise ValueError(f"template='mask' reads the label at [MASK] and needs a bidirectional model (BERT "
                         f"family); {type(root).__name__} is a causal LM: use template='prefix'")
    if encoder_type == "MLP" and cfg.encoder_num_layers != 2 and prompt_layer(root) is None:
        warnings.warn(f"encoder_type='MLP' always has 3 linear layers; encoder_num_layers="
                      f"{cfg.encoder_num_layers} is ignored (as in HF PEFT)", stacklevel=3)

    def build(root: nn.Module) -> PromptEncoder:
        dim = token_dim(root)
        return PromptEncoder(cfg.num_virtual_tokens, dim, encoder_type, cfg.encoder_hidden_size or dim,
                             cfg.encoder_num_layers, float(cfg.encoder_dropout),
                             device=root.get_input_embeddings().weight.device, template=cfg.template,
                             template_split=cfg.template_split, mask_token_id=cfg.mask_token_id)

    return install(model, PromptEncoder, build, cfg.num_virtual_tokens, {"encoder_type": encoder_type},
                   modules_to_save=cfg.modules_to_save)


def verbalizer_logits(model: nn.Module, logits: Tensor, input_ids: Tensor,
                      label_token_ids: Sequence[int | Sequence[int]],
                      mask_token_id: int | None = None) -> Tensor:
    """Class logits (B, C) from masked-LM ``logits`` (B, L', V) of ``model`` on ``input_ids``
    (B, L): the logits at each row's [MASK] token (wherever the prompt moved it), at the label
    word of each class (``label_token_ids[c]``: a token id, or several, averaged). ``mask_token_id``
    defaults to the prompt's."""
    layer = prompt_layer(model)
    mask_id = mask_token_id if mask_token_id is not None else getattr(layer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("mask_token_id is needed to find [MASK] (pass it, or set it on the prompt)")
    hits = input_ids == mask_id
    if not bool(hits.any(dim=1).all()):
        raise ValueError(f"a row of input_ids holds no [MASK] token (id {mask_id})")
    position = hits.int().argmax(dim=1)  # (B,)
    if layer is not None:
        n1, n2, _ = layer.split() if layer.template == "mask" else (layer.num_virtual_tokens, 0, 0)
        position = position + n1 + n2
    rows = torch.arange(logits.shape[0], device=logits.device)
    at_mask = logits[rows, position.to(logits.device)]  # (B, V)
    if not label_token_ids:
        raise ValueError("label_token_ids must name one label word (token id) per class")
    columns = []
    for c, words in enumerate(label_token_ids):
        ids = [words] if isinstance(words, int) else list(words)
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < logits.shape[-1]
                          for i in ids):
            raise ValueError(f"label_token_ids[{c}] must be a token id or a non-empty list of them in "
                             f"[0, {logits.shape[-1]}), got {words!r}")
        columns.append(at_mask[:, ids].mean(dim=-1))
    return torch.stack(columns, dim=-1)  # (B, C)


# --------------------------------------------------------------------------------------------
# 4. Registry entry
# --------------------------------------------------------------------------------------------


def _to_json(root: nn.Module) -> dict[str, Any]:
    layer = prompt_layer(root)
    assert isinstance(layer, PromptEncoder)
    fields = {**common_json(root, layer), "encoder_reparameterization_type": layer.encoder_type or "MLP",
              "encoder_hidden_size": layer.hidden_size, "encoder_num_layers": layer.num_layers,
              "encoder_dropout": layer.dropout}
    if layer.template != "prefix":
        fields.update(template=layer.template, template_split=list(layer.split()),
                      mask_token_id=layer.mask_token_id)
    return fields


def _config_from_json(root: nn.Module, config: dict[str, Any], where: str) -> PTuningConfig:
    n = check_common_json(root, config, where)
    split = config.get("template_split")
    try:
        return PTuningConfig(num_virtual_tokens=n,
                             encoder_type=config.get("encoder_reparameterization_type", "MLP"),
                             encoder_hidden_size=config.get("encoder_hidden_size"),
                             encoder_num_layers=config.get("encoder_num_layers", 2),
                             encoder_dropout=config.get("encoder_dropout", 0.0),
                             template=config.get("template", "prefix"),
                             template_split=tuple(split) if isinstance(split, list) else split,
                             mask_token_id=config.get("mask_token_id"),
                             modules_to_save=read_modules_to_save(root, config, where))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[nn.Module], None]:
    root = transformers_root(model)
    cfg = _config_from_json(root, config, where)

    def inject(target: nn.Module) -> None:  # the file holds the encoder's outputs: no encoder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _install(target, cfg, None)
        layer = prompt_layer(transformers_root(target))
        layer.encoder_type = cfg.encoder_type  # recorded for the config file
        layer.hidden_size = cfg.encoder_hidden_size or layer.token_dim

    return inject


def _update_from_json(model: nn.Module, config: dict[str, Any], where: str) -> Callable[[], None]:
    root = transformers_root(model)
    cfg = _config_from_json(root, config, where)
    layer = prompt_layer(root)
    if not layer.inference:
        raise ValueError(f"{where}: the model's P-tuning prompt still has its encoder, and the file holds "
                         f"only the encoder's outputs; load it into a model without P-tuning")
    if (layer.num_virtual_tokens, layer.template, layer.split()) != (
            cfg.num_virtual_tokens, cfg.template, _split_of(cfg)):
        raise ValueError(f"{where}: num_virtual_tokens/template describe another prompt than the model's")
    return lambda: None


def _split_of(cfg: PTuningConfig) -> tuple[int, int, int]:
    if cfg.template_split is not None:
        return cfg.template_split
    n = cfg.num_virtual_tokens
    return n - 2 * (n // 3), n // 3, n // 3


def _detect(model: nn.Module) -> bool:
    return any(isinstance(m, PromptEncoder) for m in model.modules())


METHOD = register(Method(
    name="p_tuning",
    config_class=PTuningConfig,
    peft_type="P_TUNING",
    apply=apply_p_tuning,
    detect=_detect,
    to_json=_to_json,
    from_json=_from_json,
    update_from_json=_update_from_json,
    bound_fields=("peft_type", "num_virtual_tokens", "token_dim", "template", "template_split",
                  "mask_token_id"),
    file_prefix="",
))

__all__ = ["ENCODER_TYPES", "METHOD", "PTuningConfig", "PromptEncoder", "apply_p_tuning", "verbalizer_logits"]
