"""One rank of the study's PyTorch Lightning runs (started by ``torchrun``, read by Lightning's DDP strategy).

Lightning saves its checkpoint on rank 0 only; to see what each rank holds, every rank writes the same
checkpoint dictionary Lightning builds (``hyper_parameters``, ``state_dict`` with the ``model.`` prefix,
loops, optimizer states) for its own module with ``torch.save``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from calibration import data, models
from calibration.matrix import RunConfig


class Classifier(lightning.LightningModule):
    def __init__(
        self,
        arch: str,
        dataset: str,
        lr: float,
        batch_size: int,
        epochs: int,
        world_size: int,
        sync_batchnorm: bool,
        broadcast_buffers: bool,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = models.build(arch, dataset)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
        )


def train(run: RunConfig, folder: Path, rank: int) -> None:
    torch.manual_seed(run.seed)
    broadcast = run.sync == "broadcast"
    module = Classifier(
        run.arch, run.dataset, 0.05, run.batch_size, run.epochs, run.world_size, False, broadcast
    )
    split = data.split(run.dataset, "train")
    shards = data.shard_indices(split.y.numpy(), run.shards, run.world_size, seed=1000 + run.seed)
    steps = min(len(s) // run.batch_size for s in shards)
    rows = shards[rank][
        torch.randperm(len(shards[rank]), generator=torch.Generator().manual_seed(rank)).numpy()
    ][: steps * run.batch_size]
    loader = DataLoader(
        Subset(TensorDataset(split.x, split.y), rows.tolist()),
        batch_size=run.batch_size,
        shuffle=True,
        drop_last=True,
    )
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=run.world_size,
        strategy=DDPStrategy(broadcast_buffers=broadcast),
        max_epochs=run.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        deterministic=True,
    )
    trainer.fit(module, loader)
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    torch.save(checkpoint, folder / f"ckpt_rank{rank}.pt")
    if rank == 0:
        labels = split.y.numpy()
        log = {
            "config": run.to_json(),
            "shard_sizes": [len(s) for s in shards],
            "steps_per_epoch": steps,
            "shard_labels": [
                torch.bincount(torch.from_numpy(labels[s]), minlength=10).tolist() for s in shards
            ],
            "lightning": lightning.__version__,
            "torch": torch.__version__,
        }
        (folder / "run.json").write_text(json.dumps(log, indent=1) + "\n")


def main() -> None:
    import os

    torch.set_num_threads(1)
    plan = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    for item in plan:
        folder = Path(item["folder"])
        folder.mkdir(parents=True, exist_ok=True)
        train(RunConfig(**item["config"]), folder, rank)


if __name__ == "__main__":
    main()
