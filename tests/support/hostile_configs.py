"""Hostile inputs for config files, and a way to run the CLI bounded in time and memory."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

# Enough for the CLI (about 40 MiB resident, 200 MiB of address space), far too little for a bomb.
DEFAULT_MEMORY_LIMIT = 512 * 1024 * 1024
DEFAULT_TIME_LIMIT = 60.0

# What a command that failed the user, rather than telling them why, prints.
TRACEBACK = "Traceback (most recent call last)"


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


def make_fifo(path: Path) -> Path:
    """A named pipe at ``path`` that nobody writes to: reading it blocks forever."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def limit_memory(limit: int = DEFAULT_MEMORY_LIMIT) -> None:
    """Cap the address space of the calling process (for ``preexec_fn``)."""
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_cli(
    *arguments: str,
    cwd: Path | None = None,
    timeout: float = DEFAULT_TIME_LIMIT,
    memory: int = DEFAULT_MEMORY_LIMIT,
) -> subprocess.CompletedProcess[str]:
    """``python -m ckpt_watcher ARGUMENTS`` under an address-space limit; TimeoutExpired on a hang."""
    return subprocess.run(
        [sys.executable, "-m", "ckpt_watcher", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=lambda: limit_memory(memory),
    )
