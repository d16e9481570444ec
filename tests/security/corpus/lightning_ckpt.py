"""A real Lightning checkpoint: Trainer.fit on a tiny BatchNorm model, saved by the checkpoint callback."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path


def fit_and_save(folder: Path) -> Path:
    import lightning as L
    import torch

    class Tiny(L.LightningModule):
        def __init__(self, width: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.BatchNorm1d(width))

        def training_step(self, batch, _index):  # type: ignore[no-untyped-def]
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            max_epochs=1,
            default_root_dir=str(folder),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(Tiny(), loader)
    path = folder / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path
