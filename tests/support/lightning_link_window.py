"""A real PyTorch Lightning run (``save_last="link"``) with ``ckpt-watcher prune`` run in the window
between each save and Lightning moving ``last.ckpt``: from ``Logger.after_save_checkpoint``, which
Lightning calls once the checkpoint file is written and before it links the last checkpoint to it
(where a daemon reacting to the closed file, or a slow logger's upload, puts a pass).

    lightning_link_window.py SCENARIO RUN_DIRECTORY POLICY REPORT [--protect PATH] [--subdirectory NAME]

SCENARIO is ``rollback`` (train to step 16, on to 40, then resume again from step 16 to 32: a loss
spike rolled back), ``restart`` (train to 40, then a fresh run to 12 in the same directory) or
``resume`` (train to 16, then resume from ``ckpt_path="last"`` to 32). ``--subdirectory`` puts a
directory in the checkpoints' ``filename`` (``steps/epoch=...``): they are written in
RUN_DIRECTORY/NAME, and ``last.ckpt`` in RUN_DIRECTORY links down to them. REPORT gets a JSON
document: each prune's deletions, and after each ``fit`` the step it started from, where each
``last*.ckpt`` points and whether it resolves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers.logger import Logger
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
        completed = subprocess.run(self.command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"prune exited {completed.returncode}: {completed.stderr[-2000:]}")
        saved = os.path.basename(checkpoint_callback._last_checkpoint_saved)
        for group in json.loads(completed.stdout)["groups"]:
            for entry in group["entries"]:
                if entry["action"] == "delete":
                    self.deletions.append({"after_save": saved, "name": entry["name"]})


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


def fit(run: Path, logger: Logger, max_steps: int, ckpt_path: Path | str | None, subdirectory: str) -> int:
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
    arguments = parser.parse_args()
    command = [sys.executable, "-m", "ckpt_watcher", "prune", str(arguments.run)]
    command += ["--policy", str(arguments.policy), "--json"]
    if arguments.protect is not None:
        command += ["--protect", str(arguments.protect)]
    deletions: list[dict[str, Any]] = []
    logger = PruneInTheWindow(command, deletions)
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
    for max_steps, ckpt_path in plan:
        started_at = fit(arguments.run, logger, max_steps, ckpt_path, subdirectory)
        after_fit.append({"max_steps": max_steps, "started_at": started_at, "links": links(arguments.run)})
    report = {"deletions": deletions, "after_fit": after_fit, "files": sorted(os.listdir(arguments.run))}
    arguments.report.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
