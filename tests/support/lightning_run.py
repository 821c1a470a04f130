"""A tiny, real PyTorch Lightning training run that writes checkpoints the way a user's trainer would.

Run as a separate process (``python tests/support/lightning_run.py DIR --manifest M.json ...``) next to
a ``ckpt-watcher watch`` daemon. Two ``ModelCheckpoint`` callbacks write into DIR:

* step checkpoints every ``--every-n-steps`` optimizer steps, named
  ``epoch={epoch:02d}-step={step:06d}-train`` (the watcher's default step template);
* one best checkpoint per validation (every epoch), named
  ``best_<YYYYMMDD>_epoch={epoch:02d}_step={step:06d}_loss={val_loss:.4f}`` (the date is a literal).

Both use ``save_top_k=-1``, so Lightning itself never deletes anything; only the watcher prunes. Exactly
one callback (``--last-on``) has ``save_last`` (``true`` or ``link``).

``val_loss`` is scripted per epoch (``--val-losses``) so a test can force a tie at the name's precision
and a last epoch that is not among the best; the real validation MSE is logged as ``val_mse``.

The manifest (JSON) records every file Lightning's checkpoint I/O wrote and every removal it asked
for, the global step at the start and end of ``fit``, the step stored in the checkpoint resumed from,
the form of ``last.ckpt`` at the end, and every Python warning raised during the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

STEP_TEMPLATE = "epoch={epoch:02d}-step={step:06d}-train"
TRAIN_SAMPLES = 64
VALIDATION_SAMPLES = 16
FEATURES = 4


def best_template(date: str) -> str:
    """The best-checkpoint template with the date as a literal, as a Lightning user writes it."""
    return f"best_{date}_epoch={{epoch:02d}}_step={{step:06d}}_loss={{val_loss:.4f}}"


class Manifest:
    """What the run did, written as JSON when the run ends (also when it fails)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "saves": [],
            "removed": [],
            "warnings": [],
            "start_global_step": None,
            "start_epoch": None,
            "final_global_step": None,
            "resumed_from": None,
            "resumed_checkpoint_global_step": None,
            "last_is_symlink": None,
            "last_link_text": None,
            "date": None,
            "error": None,
        }

    def write(self) -> None:
        """Write atomically, so a reader never sees half a manifest."""
        temporary = self.path.with_suffix(".partial")
        temporary.write_text(json.dumps(self.data, indent=2))
        os.replace(temporary, self.path)


class RecordingCheckpointIO(TorchCheckpointIO):
    """Lightning's own checkpoint I/O, recording each file it writes and each removal it asks for."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        self.manifest = manifest
        self.trainer: pl.Trainer | None = None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        val_loss = None
        if self.trainer is not None and "val_loss" in self.trainer.callback_metrics:
            val_loss = float(self.trainer.callback_metrics["val_loss"])
        self.manifest.data["saves"].append(
            {
                "path": os.path.abspath(os.fspath(path)),
                "global_step": int(checkpoint["global_step"]),
                "epoch": int(checkpoint["epoch"]),
                "val_loss": val_loss,
                "time": time.time(),
            }
        )

    def remove_checkpoint(self, path: str | Path) -> None:
        self.manifest.data["removed"].append(os.path.abspath(os.fspath(path)))
        super().remove_checkpoint(path)


class StartRecorder(Callback):
    """Records where ``fit`` starts (after a resume has restored the loop state)."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        self.manifest = manifest

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.manifest.data["start_global_step"] = int(trainer.global_step)
        self.manifest.data["start_epoch"] = int(trainer.current_epoch)


class TinyRegression(pl.LightningModule):
    """A linear regression; ``val_loss`` is scripted per epoch, the real MSE is ``val_mse``."""

    def __init__(self, val_losses: list[float], step_seconds: float, ballast_bytes: int = 0) -> None:
        super().__init__()
        self.layer = nn.Linear(FEATURES, 1)
        self.val_losses = val_losses
        self.step_seconds = step_seconds
        if ballast_bytes:  # saved with the weights: checkpoints as large as a test needs
            self.register_buffer("ballast", torch.zeros(ballast_bytes // 4, dtype=torch.float32))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, target = batch
        loss = nn.functional.mse_loss(self.layer(features), target)
        self.log("train_loss", loss)
        if self.step_seconds:
            time.sleep(self.step_seconds)  # stands in for real compute, so the watcher prunes mid-run
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        features, target = batch
        self.log("val_mse", nn.functional.mse_loss(self.layer(features), target))

    def on_validation_epoch_end(self) -> None:
        epoch = int(self.current_epoch)
        if epoch >= len(self.val_losses):
            raise ValueError(f"no scripted val_loss for epoch {epoch}")
        self.log("val_loss", torch.tensor(self.val_losses[epoch]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def make_loaders(seed: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Deterministic data: y = x . w + noise."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(FEATURES, 1, generator=generator)
    features = torch.randn(TRAIN_SAMPLES + VALIDATION_SAMPLES, FEATURES, generator=generator)
    target = features @ weights + 0.1 * torch.randn(features.shape[0], 1, generator=generator)
    train = TensorDataset(features[:TRAIN_SAMPLES], target[:TRAIN_SAMPLES])
    validation = TensorDataset(features[TRAIN_SAMPLES:], target[TRAIN_SAMPLES:])
    return (
        DataLoader(train, batch_size=8, shuffle=False),
        DataLoader(validation, batch_size=VALIDATION_SAMPLES, shuffle=False),
    )


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path, help="where both ModelCheckpoint callbacks write")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--max-epochs", type=int, required=True)
    parser.add_argument("--every-n-steps", type=int, default=3)
    parser.add_argument("--save-last", choices=["true", "link"], default="true")
    parser.add_argument("--last-on", choices=["step", "best"], default="step")
    parser.add_argument("--val-losses", required=True, help="comma-separated val_loss per epoch")
    parser.add_argument("--resume", type=Path, help="checkpoint to resume from (ckpt_path)")
    parser.add_argument("--date", help="literal date in best names (default: today, YYYYMMDD)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per training step")
    parser.add_argument(
        "--ballast-bytes", type=int, default=0, help="a buffer of this size in every checkpoint"
    )
    return parser.parse_args(argv)


def run(arguments: argparse.Namespace, manifest: Manifest) -> None:
    pl.seed_everything(arguments.seed, workers=True, verbose=False)
    torch.set_num_threads(1)
    date = arguments.date or datetime.date.today().strftime("%Y%m%d")
    manifest.data["date"] = date
    save_last: bool | Literal["link"] = True if arguments.save_last == "true" else "link"
    step_checkpoints = ModelCheckpoint(
        dirpath=arguments.directory,
        filename=STEP_TEMPLATE,
        auto_insert_metric_name=False,
        every_n_train_steps=arguments.every_n_steps,
        save_top_k=-1,
        save_last=save_last if arguments.last_on == "step" else None,
    )
    best_checkpoints = ModelCheckpoint(
        dirpath=arguments.directory,
        filename=best_template(date),
        auto_insert_metric_name=False,
        monitor="val_loss",
        mode="min",
        save_top_k=-1,
        save_last=save_last if arguments.last_on == "best" else None,
    )
    checkpoint_io = RecordingCheckpointIO(manifest)
    trainer = pl.Trainer(
        max_epochs=arguments.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=arguments.directory.parent,
        callbacks=[step_checkpoints, best_checkpoints, StartRecorder(manifest)],
        plugins=[checkpoint_io],
    )
    checkpoint_io.trainer = trainer
    model = TinyRegression(
        [float(value) for value in arguments.val_losses.split(",")],
        arguments.step_seconds,
        arguments.ballast_bytes,
    )
    train_loader, validation_loader = make_loaders(arguments.seed)
    ckpt_path: str | None = None
    if arguments.resume is not None:
        ckpt_path = str(arguments.resume)
        manifest.data["resumed_from"] = ckpt_path
        stored = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        manifest.data["resumed_checkpoint_global_step"] = int(stored["global_step"])
    trainer.fit(model, train_loader, validation_loader, ckpt_path=ckpt_path)
    manifest.data["final_global_step"] = int(trainer.global_step)
    last = arguments.directory / "last.ckpt"
    manifest.data["last_is_symlink"] = last.is_symlink()
    manifest.data["last_link_text"] = os.readlink(last) if last.is_symlink() else None


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
            for line in manifest.data["warnings"]:
                print(f"warning: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
