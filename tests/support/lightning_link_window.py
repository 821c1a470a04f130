"""A real PyTorch Lightning run (``save_last="link"``) with ``ckpt-watcher prune`` run in the window
between each save and Lightning moving ``last.ckpt``: from ``Logger.after_save_checkpoint``, which
Lightning calls once the checkpoint file is written and before it links the last checkpoint to it
(where a daemon reacting to the closed file, or a slow logger's upload, puts a pass).

    lightning_link_window.py SCENARIO RUN_DIRECTORY POLICY REPORT [--protect PATH] [--subdirectory NAME]
                             [--async-io]

SCENARIO is ``rollback`` (train to step 16, on to 40, then resume again from step 16 to 32: a loss
spike rolled back), ``restart`` (train to 40, then a fresh run to 12 in the same directory) or
``resume`` (train to 16, then resume from ``ckpt_path="last"`` to 32). ``--subdirectory`` puts a
directory in the checkpoints' ``filename`` (``steps/epoch=...``): they are written in
RUN_DIRECTORY/NAME, and ``last.ckpt`` in RUN_DIRECTORY links down to them. ``--async-io`` saves
through Lightning's ``AsyncCheckpointIO``, which links ``last.ckpt`` to a checkpoint before its thread
writes it: there the window is in that thread, once the link names the checkpoint and half of it is
written (as a save copied in from another file system leaves it), and each prune's deletions are
reported with the run's previous save (its resume point until the new one is whole). REPORT gets a JSON
document: each prune's deletions, and after each ``fit`` the step it started from, where each
``last*.ckpt`` points and whether it resolves.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

EVERY_N_STEPS = 4


class PruneInTheWindow(Logger):
    """Runs ``ckpt-watcher prune`` (the real command) right after each checkpoint is written."""

    def __init__(self, command: list[str], deletions: list[dict[str, Any]]) -> None:
        super().__init__()
        self.command = command
        self.deletions = deletions

    @property
    def name(self) -> str:
        return "prune-in-the-window"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if not self.command:
            return  # the window is in the save's own thread (--async-io)
        saved = os.path.basename(checkpoint_callback._last_checkpoint_saved)
        for name in pruned(self.command):
            self.deletions.append({"after_save": saved, "name": name})


def pruned(command: list[str]) -> list[str]:
    """The names the real ``prune`` command deleted."""
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"prune exited {completed.returncode}: {completed.stderr[-2000:]}")
    return [
        entry["name"]
        for group in json.loads(completed.stdout)["groups"]
        for entry in group["entries"]
        if entry["action"] == "delete"
    ]


class PruneWhileHalfWritten(TorchCheckpointIO):
    """Under ``AsyncCheckpointIO``: in its thread, waits for ``last.ckpt`` to name the checkpoint, writes
    half of it, runs ``prune``, then writes it whole."""

    def __init__(self, command: list[str], link: Path, deletions: list[dict[str, Any]], fit: int) -> None:
        super().__init__()
        self.fit = fit
        self.command = command
        self.link = link
        self.deletions = deletions
        self.previous: str | None = None  # the run's last whole save: its resume point meanwhile

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(1000):  # Lightning links right after handing the save to this thread
            if self.link.is_symlink() and os.path.basename(os.readlink(self.link)) == path.name:
                break
            time.sleep(0.01)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        path.write_bytes(data[: len(data) // 2])
        for name in pruned(self.command):
            self.deletions.append(
                {"fit": self.fit, "after_save": path.name, "name": name, "resume_point": self.previous}
            )
        path.write_bytes(data)
        self.previous = path.name


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.started_at: int | None = None

    def on_train_start(self) -> None:
        self.started_at = self.trainer.global_step

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.layer(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(inputs, inputs.sum(1, keepdim=True)), batch_size=4)


def fit(
    run: Path,
    logger: Logger,
    max_steps: int,
    ckpt_path: Path | str | None,
    subdirectory: str,
    plugins: list[Any],
) -> int:
    """Train to ``max_steps``; the step the run started from."""
    checkpoints = ModelCheckpoint(
        dirpath=run,
        filename=subdirectory + "epoch={epoch:02d}-step={step:06d}-train",
        auto_insert_metric_name=False,
        every_n_train_steps=EVERY_N_STEPS,
        save_top_k=-1,  # Lightning deletes nothing: only ckpt-watcher prunes
        save_last="link",
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[checkpoints],
        logger=[logger],
        plugins=plugins,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    model = Regression()
    trainer.fit(model, data(), ckpt_path=None if ckpt_path is None else str(ckpt_path))
    assert model.started_at is not None
    return model.started_at


def links(run: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for name in sorted(os.listdir(run)):
        path = run / name
        if name.startswith("last") and path.is_symlink():
            found[name] = {"target": os.readlink(path), "resolves": path.exists()}
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["rollback", "restart", "resume"])
    parser.add_argument("run", type=Path)
    parser.add_argument("policy", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("--protect", type=Path)
    parser.add_argument("--subdirectory", default="")
    parser.add_argument("--async-io", action="store_true")
    arguments = parser.parse_args()
    command = [sys.executable, "-m", "ckpt_watcher", "prune", str(arguments.run)]
    command += ["--policy", str(arguments.policy), "--json"]
    if arguments.protect is not None:
        command += ["--protect", str(arguments.protect)]
    deletions: list[dict[str, Any]] = []
    logger = PruneInTheWindow(command if not arguments.async_io else [], deletions)
    after_fit: list[dict[str, Any]] = []
    subdirectory = arguments.subdirectory + "/" if arguments.subdirectory else ""
    plan: list[tuple[int, Path | str | None]]
    if arguments.scenario == "rollback":
        resume_from = arguments.run / f"{subdirectory}epoch=00-step=000016-train.ckpt"
        plan = [(16, None), (40, resume_from), (32, resume_from)]
    elif arguments.scenario == "resume":
        plan = [(16, None), (32, "last")]
    else:
        plan = [(40, None), (12, None)]
    for fit_index, (max_steps, ckpt_path) in enumerate(plan):
        plugins: list[Any] = []
        if arguments.async_io:  # (one per fit: its resume point is that run's own previous save)
            (arguments.run / subdirectory).mkdir(parents=True, exist_ok=True)  # linked before written
            plugins = [
                AsyncCheckpointIO(
                    PruneWhileHalfWritten(command, arguments.run / "last.ckpt", deletions, fit_index)
                )
            ]
        started_at = fit(arguments.run, logger, max_steps, ckpt_path, subdirectory, plugins)
        after_fit.append({"max_steps": max_steps, "started_at": started_at, "links": links(arguments.run)})
    report = {"deletions": deletions, "after_fit": after_fit, "files": sorted(os.listdir(arguments.run))}
    arguments.report.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
