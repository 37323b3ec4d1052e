"""A small causal-LM LightningModule over a tiny random Llama, for callback tests."""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests import _tiny

VOCAB = 96


class TinyLM(pl.LightningModule):
    def __init__(self, build_in_configure_model: bool = False, lr: float = 1e-2, hidden: int = 32,
                 vocab: int = VOCAB, seed: int = 0):
        super().__init__()
        self.lr, self.hidden, self.vocab, self.seed = lr, hidden, vocab, seed
        self.build_in_configure_model = build_in_configure_model
        self.model = None
        self.configure_model_calls = 0
        if not build_in_configure_model:
            self.model = _tiny.llama(seed, hidden=hidden, vocab=vocab).train()

    def configure_model(self):
        self.configure_model_calls += 1
        if self.model is None:
            self.model = _tiny.llama(self.seed, hidden=self.hidden, vocab=self.vocab).train()

    def forward(self, ids):
        return self.model(ids).logits

    def _loss(self, batch):
        (ids,) = batch
        return self.model(ids, labels=ids).loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loader(n: int = 16, seq: int = 12, batch_size: int = 4, seed: int = 0, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
