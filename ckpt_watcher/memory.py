"""Giving memory back after a large pass: a long-running daemon should not keep a big pass's peak.

A pass over a group of 100,000 checkpoints builds its records, decisions and scan state (hundreds of
MB at its peak), then drops them. CPython returns an arena only when every object in it is freed, and
glibc keeps freed heap memory below its (dynamically raised) trim threshold, so without help the
process keeps most of that peak resident for the rest of its life. ``release_memory`` runs a full
collection (which also empties the interpreter's free lists) and asks glibc to return what is free
(``malloc_trim(0)``); both cost a few milliseconds, so it is called after a pass that looked at many
files, never after each small one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# A pass that looked at fewer files than this leaves too little behind to be worth a collection.
LARGE_PASS_FILES = 10_000


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, or no C library to load)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim), or no libc found
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_memory() -> None:
    """Collect garbage and return freed heap memory to the operating system (glibc only)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_after(files: int) -> bool:
    """``release_memory`` if a pass looked at ``files`` files, enough to matter; True if it did."""
    if files < LARGE_PASS_FILES:
        return False
    release_memory()
    return True


@contextmanager
def no_cyclic_collection() -> Iterator[None]:
    """No cyclic garbage collection inside the block (as it was again after it, if it was on).

    A pass builds a few objects per checkpoint, none of them cyclic garbage; the collector would only
    traverse them again and again as they pile up (a quarter of a one-shot run's time at 100,000
    checkpoints, ~7% of a daemon's start-up pass). Nested blocks leave it to the outermost."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
