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

    def predict_step(self, batch, batch_idx):
        (ids,) = batch
        return self(ids)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TinyBN(pl.LightningModule):
    """A regressor ``fc2(relu(bn(fc1(x))))`` whose BatchNorm is trained in full (modules_to_save),
    for the checkpointing of adapter buffers (running statistics)."""

    def __init__(self, seed: int = 0, features: int = 8, hidden: int = 16, lr: float = 1e-2):
        super().__init__()
        torch.manual_seed(seed)
        self.lr = lr
        self.fc1 = torch.nn.Linear(features, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)
        self.fc2 = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def regression_loader(n: int = 16, features: int = 8, batch_size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g) * 3 + 1  # running statistics far from (0, 1)
    return DataLoader(TensorDataset(x, x.sum(-1)), batch_size=batch_size, shuffle=False)


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
