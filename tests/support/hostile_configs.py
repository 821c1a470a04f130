"""Hostile inputs for config files: YAML bombs and documents nested too deep, and a store that fails
to answer for a while."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ckpt_watcher.config_access import LocalConfigFiles
from ckpt_watcher.config_files import ConfigFileError


def alias_bomb(levels: int = 9, fanout: int = 9, key: str = "trainer") -> str:
    """A billion-laughs YAML document: ``fanout ** levels`` values from a few hundred bytes.

    The top-level ``key`` is a mapping whose every value nests the bomb one more level, so whatever
    walks the document (looking for ``ckpt_path``, say) meets all of it.
    """
    lines = ['a0: &a0 {ckpt_path: "x"}']
    for level in range(1, levels + 1):
        previous = f"*a{level - 1}"
        members = ", ".join(f"k{index}: {previous}" for index in range(fanout))
        lines.append(f"a{level}: &a{level} {{{members}}}")
    lines.append(f"{key}: *a{levels}")
    return "\n".join(lines) + "\n"


def sequence_bomb(levels: int = 9, fanout: int = 9) -> str:
    """The classic billion laughs, with lists."""
    lines = ['a0: &a0 ["lol"]']
    for level in range(1, levels + 1):
        members = ", ".join([f"*a{level - 1}"] * fanout)
        lines.append(f"a{level}: &a{level} [{members}]")
    lines.append(f"save_top_k_best: *a{levels}")
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int = 20, fanout: int = 3) -> str:
    """Merge keys (``<<``) whose flattened key lists grow by ``fanout`` per level."""
    lines = ["m0: &m0 {x: 1, y: 2}"]
    for level in range(1, levels + 1):
        members = ", ".join([f"*m{level - 1}"] * fanout)
        lines.append(f"m{level}: &m{level} {{<<: [{members}], z{level}: 1}}")
    lines.append(f"trainer: *m{levels}")
    return "\n".join(lines) + "\n"


def deep_flow(levels: int) -> str:
    """A value nested ``levels`` deep: ``save_top_k_best: [[[...]]]``."""
    return "save_top_k_best: " + "[" * levels + "1" + "]" * levels + "\n"


def deep_block(levels: int, leaf: str = "ckpt_path: x") -> str:
    """Block mappings nested ``levels`` deep, ending in ``leaf``."""
    lines = [" " * level + f"k{level}:" for level in range(levels)]
    lines.append(" " * levels + leaf)
    return "\n".join(lines) + "\n"


class FlakyConfigFiles(LocalConfigFiles):
    """The disk, but the first ``failures`` reads fail as a store answering 503 does (``transient``;
    with ``transient=False``, as a file whose contents are refused)."""

    def __init__(self, failures: int, *, transient: bool = True) -> None:
        self.failures = failures
        self.transient = transient
        self.reads = 0

    def read_text(self, path: Path, *, confined_to: Sequence[Path] = ()) -> str:
        """Count the read; fail it while ``failures`` reads have not failed yet."""
        self.reads += 1
        if self.reads <= self.failures:
            raise ConfigFileError(
                "cannot be read: SlowDown: Please reduce your request rate.", transient=self.transient
            )
        return super().read_text(path, confined_to=confined_to)
