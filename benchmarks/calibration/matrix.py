"""The matrix of training runs: configurations, the tuning / held-out split and what each run must get."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SYNCED = ("broadcast", "syncbn", "epoch_allreduce")
IID_SHARDS = ("iid",)
NON_IID_SHARDS = ("sorted", "dirichlet0.1", "domain_all", "domain_one")
# (architecture, dataset) groups: thresholds are chosen on the tuning groups only.
TUNING_GROUPS = (("cnn", "digits"), ("mlp", "fair"))
HELDOUT_GROUPS = (("rescnn", "digits"), ("mlp", "digits_flat"))


@dataclass(frozen=True)
class RunConfig:
    """One training run.

    Attributes:
        sync: ``broadcast`` (DDP's default buffer broadcast), ``syncbn`` (SyncBatchNorm semantics), ``none``
            (no buffer synchronisation), ``epoch_allreduce`` (buffers averaged at each epoch's end, as timm's
            ``distribute_bn`` and mmengine's ``SyncBuffersHook`` do).
        shards: ``iid``, ``uneven`` (iid, sizes 1:2:...:N), ``sorted`` (label-sorted blocks),
            ``dirichlet0.1``, ``dirichlet1.0`` (class proportions), ``domain_all`` / ``domain_one`` (iid
            rows, every node / one node recording its inputs differently).
        framework: ``ddp`` (a plain DDP loop) or ``lightning`` (PyTorch Lightning's DDP strategy).
        layout: ``timm`` (``state_dict`` + an ``args`` Namespace with timm's flags) or ``plain`` (``model``).
    """

    name: str
    arch: str
    dataset: str
    sync: str
    shards: str
    world_size: int
    batch_size: int
    epochs: int
    framework: str = "ddp"
    layout: str = "plain"
    seed: int = 0

    @property
    def half(self) -> str:
        return "tuning" if (self.arch, self.dataset) in TUNING_GROUPS else "heldout"

    @property
    def expectation(self) -> str:
        """``pass`` (synchronised: no warning), ``fail`` (unsynchronised, non-iid), ``no-fail``
        (unsynchronised, iid) or ``any``: Dirichlet(1.0) shards, and uneven shards, whose ranks take
        different numbers of steps (under ``Join``) and so hold statistics of different steps: no
        requirement, the verdict is reported."""
        if self.sync in SYNCED:
            return "pass"
        if self.shards in NON_IID_SHARDS:
            return "fail"
        return "no-fail" if self.shards in IID_SHARDS else "any"

    @property
    def shift(self) -> str:
        return self.shards.removeprefix("domain_") if self.shards.startswith("domain_") else "none"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "half": self.half, "expectation": self.expectation}


# (sync, shards) of every group; world size, batch and length rotate so every group sees each value.
_TEMPLATES = (
    ("broadcast", "iid"),
    ("broadcast", "sorted"),
    ("broadcast", "dirichlet0.1"),
    ("broadcast", "domain_all"),
    ("syncbn", "sorted"),
    ("syncbn", "dirichlet0.1"),
    ("epoch_allreduce", "sorted"),
    ("epoch_allreduce", "domain_all"),
    ("none", "iid"),
    ("none", "uneven"),
    ("none", "sorted"),
    ("none", "dirichlet0.1"),
    ("none", "dirichlet1.0"),
    ("none", "domain_all"),
    ("none", "domain_one"),
    ("none", "iid"),
)
_WORLDS = (2, 4, 8)
_BATCHES = (8, 16, 32, 64)
_EPOCHS = (6, 12, 20)


def _group_runs(arch: str, dataset: str, offset: int) -> list[RunConfig]:
    runs = []
    for i, (sync, shards) in enumerate(_TEMPLATES):
        world = _WORLDS[(i + offset) % 3]
        batch = _BATCHES[(i + 2 * offset) % 4]
        epochs = _EPOCHS[(i // 3 + offset) % 3]
        layout = "timm" if (i + offset) % 2 else "plain"
        name = f"{arch}-{dataset}-{sync}-{shards}-w{world}-b{batch}-e{epochs}"
        runs.append(RunConfig(name, arch, dataset, sync, shards, world, batch, epochs, "ddp", layout, i))
    return runs


def full_matrix() -> list[RunConfig]:
    """Every run of the study: 16 per (architecture, dataset) group, plus two Lightning runs."""
    runs: list[RunConfig] = []
    for offset, (arch, dataset) in enumerate((*TUNING_GROUPS, *HELDOUT_GROUPS)):
        runs.extend(_group_runs(arch, dataset, offset))
    for sync in ("broadcast", "none"):
        name = f"rescnn-digits-{sync}-sorted-w2-b32-e12-lightning"
        runs.append(RunConfig(name, "rescnn", "digits", sync, "sorted", 2, 32, 12, "lightning", "lightning"))
    return runs


def smoke_matrix() -> list[RunConfig]:
    """Three short 2-rank runs (one per expectation) for CI: the whole pipeline in well under a minute."""
    base = {"arch": "cnn", "dataset": "digits", "world_size": 2, "batch_size": 32, "epochs": 2}
    return [
        RunConfig(f"smoke-{sync}-{shards}", sync=sync, shards=shards, layout=layout, **base)  # type: ignore[arg-type]
        for sync, shards, layout in (
            ("broadcast", "iid", "timm"),
            ("none", "sorted", "plain"),
            ("none", "iid", "plain"),
        )
    ]
