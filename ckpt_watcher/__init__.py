"""ckpt-watcher: a retention daemon that keeps a training run's checkpoint directory within its policy."""

__version__ = "0.1.0"
