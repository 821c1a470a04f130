"""A tiny, real PyTorch Lightning training that saves a checkpoint after every optimizer step.

Run as its own process by ``bench/interference.py`` (``python bench/train_steps.py DIR --steps N
--result R.json``), once alone and once with a ``ckpt-watcher watch DIR`` daemon beside it. Based on
``tests/support/lightning_run.py``: a linear regression on a few samples, one ``ModelCheckpoint`` with
``every_n_train_steps=1`` and ``save_top_k=-1`` (Lightning itself never deletes; only the daemon
prunes), step checkpoints named with the daemon's default step template.

The result (JSON) is the wall time of the steps after ``--warmup``, so interpreter start-up, imports and
the first steps (allocator and file-cache warm-up) are not counted: ``steps_per_second`` is the training
throughput a user would see in the steady state.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

STEP_TEMPLATE = "epoch={epoch:02d}-step={step:06d}-train"
FEATURES = 4
BATCH_SIZE = 8


class StepClock(Callback):
    """Records when each training batch ended (after the checkpoint of that step is written)."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.ends.append(time.perf_counter())


class TinyRegression(pl.LightningModule):
    """A linear regression: the compute per step is negligible, so checkpoint I/O dominates."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(FEATURES, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, target = batch
        return nn.functional.mse_loss(self.layer(features), target)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path, help="where the step checkpoints are written")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps (one checkpoint each)")
    parser.add_argument("--warmup", type=int, default=20, help="steps not counted in the throughput")
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--result", type=Path, required=True, help="JSON file for the timings")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    if arguments.steps <= arguments.warmup:
        raise SystemExit("--steps must be larger than --warmup")
    pl.seed_everything(1234, verbose=False)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1234)
    samples = arguments.steps_per_epoch * BATCH_SIZE
    features = torch.randn(samples, FEATURES, generator=generator)
    target = features @ torch.randn(FEATURES, 1, generator=generator)
    loader = DataLoader(TensorDataset(features, target), batch_size=BATCH_SIZE, shuffle=False)
    clock = StepClock()
    trainer = pl.Trainer(
        max_steps=arguments.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=arguments.directory.parent,
        callbacks=[
            ModelCheckpoint(
                dirpath=arguments.directory,
                filename=STEP_TEMPLATE,
                auto_insert_metric_name=False,
                every_n_train_steps=1,
                save_top_k=-1,
            ),
            clock,
        ],
    )
    trainer.fit(TinyRegression(), loader)
    counted = clock.ends[arguments.warmup - 1 :]
    seconds = counted[-1] - counted[0]
    steps = len(counted) - 1
    result = {
        "steps": steps,
        "seconds": seconds,
        "steps_per_second": steps / seconds,
        "global_step": int(trainer.global_step),
        "checkpoints_left": len(list(arguments.directory.glob("*.ckpt"))),
    }
    arguments.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
