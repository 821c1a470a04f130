"""lightning_run.py's tiny training run, writing its checkpoints to a bucket: ``ModelCheckpoint(dirpath=
"s3://...")`` through fsspec/s3fs, as Lightning users do (the endpoint and credentials come from the
standard AWS environment). ``last.ckpt`` is written by the step callback (``save_last=True``: on a
bucket it is an object, a bucket has no symlinks); Lightning itself never deletes (``save_top_k=-1``).

    python tests/support/lightning_s3_run.py s3://bucket/run --manifest M.json --max-epochs 6 ...

The manifest records each checkpoint written (its URL, epoch, step, val_loss), where ``fit`` started
and ended, and the step stored in the checkpoint resumed from.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import fsspec
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.lightning_run import (
    STEP_TEMPLATE,
    Manifest,
    StartRecorder,
    TinyRegression,
    best_template,
    make_loaders,
)


class RecordingS3CheckpointIO(TorchCheckpointIO):
    """Lightning's own checkpoint I/O (fsspec for a URL), recording each URL it writes or removes."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        self.manifest = manifest
        self.trainer: pl.Trainer | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        val_loss = None
        if self.trainer is not None and "val_loss" in self.trainer.callback_metrics:
            val_loss = float(self.trainer.callback_metrics["val_loss"])
        self.manifest.data["saves"].append(
            {
                "path": str(path),
                "global_step": int(checkpoint["global_step"]),
                "epoch": int(checkpoint["epoch"]),
                "val_loss": val_loss,
                "time": time.time(),
            }
        )

    def remove_checkpoint(self, path: Any) -> None:
        self.manifest.data["removed"].append(str(path))
        super().remove_checkpoint(path)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", help="s3://bucket/prefix where both ModelCheckpoint callbacks write")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--root-dir", type=Path, required=True, help="Lightning's default_root_dir (local)")
    parser.add_argument("--max-epochs", type=int, required=True)
    parser.add_argument("--every-n-steps", type=int, default=3)
    parser.add_argument("--val-losses", required=True)
    parser.add_argument("--resume", help="checkpoint URL to resume from (ckpt_path)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    return parser.parse_args(argv)


def run(arguments: argparse.Namespace, manifest: Manifest) -> None:
    pl.seed_everything(arguments.seed, workers=True, verbose=False)
    torch.set_num_threads(1)
    date = datetime.date.today().strftime("%Y%m%d")
    manifest.data["date"] = date
    steps = ModelCheckpoint(
        dirpath=arguments.url,
        filename=STEP_TEMPLATE,
        auto_insert_metric_name=False,
        every_n_train_steps=arguments.every_n_steps,
        save_top_k=-1,
        save_last=True,
    )
    bests = ModelCheckpoint(
        dirpath=arguments.url,
        filename=best_template(date),
        auto_insert_metric_name=False,
        monitor="val_loss",
        mode="min",
        save_top_k=-1,
    )
    checkpoint_io = RecordingS3CheckpointIO(manifest)
    trainer = pl.Trainer(
        max_epochs=arguments.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=arguments.root_dir,
        callbacks=[steps, bests, StartRecorder(manifest)],
        plugins=[checkpoint_io],
    )
    checkpoint_io.trainer = trainer
    model = TinyRegression(
        [float(value) for value in arguments.val_losses.split(",")], arguments.step_seconds
    )
    train_loader, validation_loader = make_loaders(arguments.seed)
    if arguments.resume is not None:
        manifest.data["resumed_from"] = arguments.resume
        with fsspec.open(arguments.resume, "rb") as stored_file:
            stored = torch.load(stored_file, map_location="cpu", weights_only=False)
        manifest.data["resumed_checkpoint_global_step"] = int(stored["global_step"])
    trainer.fit(model, train_loader, validation_loader, ckpt_path=arguments.resume)
    manifest.data["final_global_step"] = int(trainer.global_step)


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    manifest = Manifest(arguments.manifest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run(arguments, manifest)
        except BaseException as error:
            manifest.data["error"] = repr(error)
            raise
        finally:
            manifest.data["warnings"] = [f"{item.category.__name__}: {item.message}" for item in caught]
            manifest.write()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
