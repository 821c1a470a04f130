"""A real PyTorch Lightning run whose monitored ``val_loss`` ties (a finite validation set gives such
metrics as multiples of 1/n): ``LOSSES`` per epoch, one best checkpoint per validation with Lightning's
own ``save_top_k=-1`` (only ckpt-watcher prunes). Then ``ckpt-watcher prune`` (the real command) with
POLICY, and ``trainer.test(ckpt_path="best")``, which loads Lightning's ``best_model_path``.

    lightning_best_tie.py RUN_DIRECTORY POLICY REPORT

REPORT gets a JSON document: Lightning's best_model_path (its name), whether it still exists after
the prune, and whether ``trainer.test(ckpt_path="best")`` could load it.
"""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

LOSSES = [0.5, 0.25, 0.25, 0.25]  # epoch 1 reaches the best; epochs 2 and 3 only tie it


class Tied(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        loss: torch.Tensor = self.layer(batch[0]).pow(2).mean()
        return loss

    def validation_step(self, batch: Any, batch_index: int) -> None:
        self.log("val_loss", LOSSES[self.current_epoch])

    def test_step(self, batch: Any, batch_index: int) -> None:
        self.log("test_value", 1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    run, policy, report = (Path(argument) for argument in sys.argv[1:4])
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    today = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    best = ModelCheckpoint(
        dirpath=run,
        monitor="val_loss",
        mode="min",
        save_top_k=-1,
        auto_insert_metric_name=False,
        filename=f"best_{today}_epoch={{epoch:02d}}_step={{step:06d}}_loss={{val_loss:.4f}}",
    )
    trainer = pl.Trainer(
        max_epochs=len(LOSSES),
        callbacks=[best],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Tied(), data, data)
    command = [
        sys.executable,
        "-m",
        "ckpt_watcher",
        "prune",
        str(run),
        "--policy",
        str(policy),
        "--settle",
        "0",
    ]
    pruned = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        trainer.test(ckpt_path="best", dataloaders=data, verbose=False)
        loaded = True
    except FileNotFoundError:
        loaded = False
    document = {
        "prune_exit": pruned.returncode,
        "best_model_path": Path(best.best_model_path).name,
        "exists": Path(best.best_model_path).exists(),
        "test_loaded_best": loaded,
        "files": sorted(path.name for path in run.iterdir()),
    }
    report.write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
