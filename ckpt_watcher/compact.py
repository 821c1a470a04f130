"""What a daemon remembers per file between passes, packed: a few large buffers, no small objects.

A dict of 100,000 entries is 100,000 small key objects (and values). Made while a pass's records are
alive, they land in the interpreter's memory arenas between those records, and an arena goes back to
the system only when every object in it is gone: the dicts a pass keeps would pin most of that pass's
peak (~70 MB after the start-up pass of one 100,000-checkpoint group). Packed, the same facts are a
few ``bytes``/``array`` buffers (8 bytes per hash, the fixed width of a packed identity) allocated
outside those arenas. A pass that needs them unpacks them into a dict or a set, which it drops again
when it packs what it keeps.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from itertools import repeat
from typing import Any

_HASH = "q"  # a Python hash is a signed 64-bit integer
_HASH_RANGE = range(-(2**63), 2**63)


class PackedHashes:
    """An immutable set of integers (hashes), 8 bytes each."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[int] = ()) -> None:
        self._items = array(_HASH, items)

    def __len__(self) -> int:
        return len(self._items)

    def unpacked(self) -> set[int]:
        """The integers, as a set (for lookups during a pass)."""
        return set(self._items)


def _chunks(packed: bytes, width: int) -> Iterator[bytes]:
    return (packed[start : start + width] for start in range(0, len(packed), width))


class PackedKeys:
    """An immutable mapping from ``bytes`` keys of one ``width`` to values, most of them one ``common``
    value (a verdict cache: most files are simply complete). Keys with the common value are packed
    side by side as they come (no object kept per key); any other entry stays in a small dict."""

    __slots__ = ("_common", "_others", "_packed", "_width")

    def __init__(self, entries: Iterable[tuple[bytes, Any]], *, width: int, common: Any) -> None:
        self._width = width
        self._common = common
        packed = bytearray()
        self._others: dict[bytes, Any] = {}
        for key, value in entries:
            if len(key) == width and (value is common or value == common):
                packed += key
            else:
                self._others[key] = value
        self._packed = bytes(packed)

    def __len__(self) -> int:
        return len(self._packed) // self._width + len(self._others)

    def unpacked(self) -> dict[bytes, Any]:
        """Every entry, as a dict (a key given twice is one entry)."""
        entries = dict(zip(_chunks(self._packed, self._width), repeat(self._common)))
        entries.update(self._others)
        return entries


class PackedValues:
    """An immutable mapping from integers (hashes) to ``bytes`` values of one ``width``: both packed as
    they come (8 bytes and ``width`` bytes an entry); an entry that does not fit stays in a small dict."""

    __slots__ = ("_keys", "_others", "_values", "_width")

    def __init__(self, entries: Iterable[tuple[int, bytes]], *, width: int) -> None:
        packing = ValuesPacking(width)
        self._others: dict[int, bytes] = {}
        for key, value in entries:
            if not packing.append(key, value):
                self._others[key] = value
        self._width = width
        self._keys, self._values = packing.buffers()

    @classmethod
    def of_packing(cls, packing: ValuesPacking) -> PackedValues:
        """The mapping of what ``packing`` holds, its buffers taken over as they are (no entry walked)."""
        packed = cls((), width=packing.width)
        packed._keys, packed._values = packing.buffers()
        return packed

    def __len__(self) -> int:
        return len(self._keys) + len(self._others)

    def unpacked(self) -> dict[int, bytes]:
        """Every entry, as a dict (a key given twice: its last value)."""
        entries = dict(zip(self._keys, _chunks(self._values, self._width), strict=True))
        entries.update(self._others)
        return entries


class KeysPacking:
    """The entries of a ``PackedKeys`` as they come, before it is made: each ``width``-byte key appended
    to one buffer, its value to a list (a pointer: most values are one shared object). Nothing is
    looked up while it fills, so no key object is kept."""

    __slots__ = ("_keys", "_values", "_width")

    def __init__(self, width: int) -> None:
        self._width = width
        self._keys = bytearray()
        self._values: list[Any] = []

    def __len__(self) -> int:
        return len(self._values)

    def append(self, key: bytes, value: Any) -> bool:
        """Add the entry if its key is ``width`` bytes long; False (nothing added) if not."""
        if len(key) != self._width:
            return False
        self._keys += key
        self._values.append(value)
        return True

    def key_at(self, index: int) -> bytes:
        """The key of the ``index``-th entry appended."""
        start = index * self._width
        return bytes(self._keys[start : start + self._width])

    def entries(self) -> Iterator[tuple[bytes, Any]]:
        """Every entry, in the order appended."""
        return zip(_chunks(bytes(self._keys), self._width), self._values, strict=True)


class ValuesPacking:
    """The entries of a ``PackedValues`` as they come: integer keys in one array, ``width``-byte values
    side by side in one buffer."""

    __slots__ = ("_keys", "_values", "_width")

    def __init__(self, width: int) -> None:
        self._width = width
        self._keys = array(_HASH)
        self._values = bytearray()

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def width(self) -> int:
        """The length of every value."""
        return self._width

    def buffers(self) -> tuple[array[int], bytes]:
        """The keys and the values side by side, as ``PackedValues`` holds them."""
        return self._keys, bytes(self._values)

    def append(self, key: int, value: bytes) -> bool:
        """Add the entry if it fits (a 64-bit key, a value ``width`` bytes long); False if not."""
        if len(value) != self._width or key not in _HASH_RANGE:
            return False
        self._keys.append(key)
        self._values += value
        return True

    def key_at(self, index: int) -> int:
        """The key of the ``index``-th entry appended."""
        return self._keys[index]

    def entries(self) -> Iterator[tuple[int, bytes]]:
        """Every entry, in the order appended."""
        return zip(self._keys, _chunks(bytes(self._values), self._width), strict=True)
